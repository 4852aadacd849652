// An outside project's program: a model that is not in diffuse (a timestep-conditioned MLP with a
// FiLM layer and a layer-norm block), written from the public layers and ops, trained for a few
// steps on the device named on the command line. Built against diffuse through add_subdirectory()
// and find_package() (installed, also header-only through diffuse::headers); linked with
// diffuse::cuda as well where diffuse has CUDA.
//
//   diffuse_consumer [cpu|cuda]     prints the losses; "cuda" without a usable device fails in one line
#include <diffuse/diffuse.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

using namespace diffuse;

namespace {

class FilmMLP : public Module<float> {
 public:
  explicit FilmMLP(Generator& g) : in(2, 32, g), film(16, 64, g), mid(32, 32, g), out(32, 2, g) {
    register_module("in", in);
    register_module("film", film);
    register_module("mid", mid);
    register_module("out", out);
    ln_w = register_parameter("ln.weight", Tensor<float>::ones({32}));
    ln_b = register_parameter("ln.bias", Tensor<float>::zeros({32}));
  }
  Var<float> operator()(const Var<float>& x, const std::vector<int32_t>& t) const {
    const Var<float> f = film(Var<float>(timestep_embedding<float>(t, 16, x.device())));  // [B, 64]
    Var<float> h = silu(in(x));
    h = add(mul(h, slice(f, 1, 0, 32)), slice(f, 1, 32, 64));  // FiLM: scale and shift
    h = add(h, gelu(mid(layer_norm(h, ln_w, ln_b))));
    return out(h);
  }

  Linear<float> in, film, mid, out;
  Var<float> ln_w, ln_b;
};

}  // namespace

int main(int argc, char** argv) {
  const std::string want = argc > 1 ? argv[1] : "cpu";
  try {
    const Device dev = want == "cuda" ? Device::CUDA : Device::CPU;
    if (dev == Device::CUDA && !cuda_available()) throw std::runtime_error("cuda: " + cuda_unavailable_reason());
    Generator g(0);
    FilmMLP model(g);
    model.to(dev);
    Adam<float> opt(model.named_parameters(), AdamOptions{});
    const NoiseSchedule s = NoiseSchedule::linear(100);
    const Tensor<float> x0 = Tensor<float>::randn({64, 2}, g).to(dev);
    for (int step = 0; step < 5; ++step) {
      auto nb = make_noised_batch(s, x0, g);
      opt.zero_grad();
      const Var<float> loss = mse(model(Var<float>(nb.x_t), nb.t), Var<float>(nb.eps));
      backward(loss);
      opt.step();
      const float l = loss.value().cpu()[0];
      std::printf("diffuse %s on %s: step %d loss %.4f\n", version(), device_name(dev), step, l);
      if (!std::isfinite(l)) return 1;
    }
    return std::strcmp(version(), "0.1.0") == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "diffuse_consumer: error: %s\n", e.what());
    return 2;
  }
}
