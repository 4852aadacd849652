// Outside consumer of diffuse: checks that the umbrella header compiles and
// links through add_subdirectory() and through find_package().
#include <diffuse/diffuse.hpp>

#include <cstdio>
#include <cstring>

int main() {
  std::printf("diffuse %s\n", diffuse::version());
  return std::strcmp(diffuse::version(), "0.1.0") == 0 ? 0 : 1;
}
