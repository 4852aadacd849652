// The Catch2 main(), compiled once into diffuse_catch_main and linked into
// every test executable.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
