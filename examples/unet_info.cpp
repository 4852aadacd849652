// unet_info: a U-Net configuration's parameter count and every parameter's
// name and shape (the names are the PyTorch reference's).
#include <CLI/CLI.hpp>
#include <diffuse/diffuse.hpp>

#include "flag_checks.hpp"

#include <cstdio>
#include <string>

using namespace diffuse;

int main(int argc, char** argv) {
  std::string preset = "mnist16";
  int64_t ch = 0, classes = 0, heads = 0;
  bool quiet = false;
  CLI::App app{"Print a U-Net configuration's parameters (name, shape, count) and the total."};
  app.add_option("--config", preset, "mnist16 (no attention), mnist16-one8, mnist16-ho8, cifar10")
      ->capture_default_str()
      ->check(CLI::IsMember({"mnist16", "mnist16-one8", "mnist16-ho8", "cifar10"}));
  app.add_option("--ch", ch, "override the base width (0 = the configuration's)")
      ->check(diffuse::examples::whole_in(0, 65536));
  app.add_option("--classes", classes, "class-conditional with this many classes (+1 null class)")
      ->check(diffuse::examples::whole_in(0, 1 << 20));
  app.add_option("--heads", heads, "attention heads (0 = the configuration's); they must divide the attention blocks' channels")
      ->check(diffuse::examples::whole_in(0, 65536));
  app.add_flag("--quiet,-q", quiet, "print the total only");
  CLI11_PARSE(app, argc, argv);
  try {
    UNetConfig c = preset == "cifar10"        ? UNetConfig::cifar10()
                   : preset == "mnist16-one8" ? UNetConfig::mnist16("one8")
                   : preset == "mnist16-ho8"  ? UNetConfig::mnist16("ho8")
                                              : UNetConfig::mnist16("none");
    if (ch > 0) c.ch = ch;
    if (heads > 0) c.attn_heads = heads;
    c.num_classes = classes;
    Generator g(0);
    UNet<float> m(c, g);
    if (!quiet)
      for (auto& [name, p] : m.named_parameters())  // PyTorch's shapes (conv weights are kept OHWI)
        std::printf("%-32s %-20s %10lld\n", name.c_str(), shape_str(torch_shape(p.shape(), p.layout())).c_str(),
                    static_cast<long long>(p.value().numel()));
    std::printf("%s: %lld parameters\n", preset.c_str(), static_cast<long long>(m.num_parameters()));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unet_info: error: %s\n", e.what());
    return 1;
  }
}
