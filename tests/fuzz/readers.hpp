// The readers under fuzzing (issue 21): each takes arbitrary bytes as the file it reads. A reader
// may refuse them with a std::exception (that is its job); a crash, a hang, a sanitizer report or
// an allocation the file cannot justify (libFuzzer's -malloc_limit_mb) is a bug. Used by the
// libFuzzer harnesses (tests/fuzz/fuzz_<reader>.cpp, scripts/fuzz.sh) and by the regression run
// over tests/corpus/<reader>/ that ctest makes with the normal compiler (corpus_main.cpp).
#pragma once

#include <diffuse/data/image_folder.hpp>
#include <diffuse/data/image_set.hpp>
#include <diffuse/data/points2d.hpp>
#include <diffuse/eval/fid.hpp>
#include <diffuse/eval/frechet.hpp>
#include <diffuse/eval/lenet_score.hpp>
#include <diffuse/io/checkpoint.hpp>
#include <diffuse/models/toy_mlp.hpp>
#include <diffuse/optim/adam.hpp>
#include <diffuse/optim/ema.hpp>
#include <diffuse/io/idx.hpp>
#include <diffuse/io/npy.hpp>
#include <diffuse/io/safetensors.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <unistd.h>

namespace diffuse::fuzz {

// A per-process scratch folder; the bytes are written to DIR/NAME and the reader reads that path.
inline const std::filesystem::path& scratch() {
  static const std::filesystem::path d = [] {
    auto p = std::filesystem::temp_directory_path() / ("diffuse_fuzz_" + std::to_string(::getpid()));
    std::filesystem::create_directories(p);
    return p;
  }();
  return d;
}

inline std::string put(const std::string& name, const uint8_t* data, size_t size) {
  const std::string p = (scratch() / name).string();
  std::FILE* f = std::fopen(p.c_str(), "wb");
  if (!f) throw std::runtime_error("fuzz: cannot write " + p);
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
  return p;
}

// The model a fuzzed checkpoint is loaded into: a ToyMLP small enough to build per input.
inline ToyMLPConfig tiny_mlp() {
  ToyMLPConfig c;
  c.hidden = 4;
  c.layers = 1;
  c.temb_dim = 4;
  return c;
}
inline LeNetConfig tiny_lenet() { return LeNetConfig{8, 2, 3, 4, 10}; }

// The FID network weights are read into: pytorch-fid's InceptionV3, built once per process (its
// 24M weights take seconds to make; reading a file into it is what is fuzzed).
inline FidInceptionV3<float>& inception() {
  static FidInceptionV3<float>* net = [] {
    Generator g(1);
    return new FidInceptionV3<float>(g);  // never destroyed: the fuzzer ends the process
  }();
  return *net;
}

// Valid files to start fuzzing from, written by the library itself (corpus_main --make-seeds).
inline void make_seeds(const std::filesystem::path& corpus) {
  Generator g(1);
  ToyMLP<float> m(tiny_mlp(), g);
  Adam<float> opt(m.named_parameters(), AdamOptions{});
  EMA<float> ema(m.named_parameters(), 0.9);
  std::filesystem::create_directories(corpus / "checkpoint");
  save_checkpoint((corpus / "checkpoint" / "seed-toy").string(), m, &opt, &ema, 7, g);
  LeNet<float> net(tiny_lenet(), g);
  std::filesystem::create_directories(corpus / "lenet");
  save_lenet((corpus / "lenet" / "seed-tiny").string(), net, "area", 0.5);
  // Inception weights: the first tensors pytorch-fid's file holds, with their shapes (a whole
  // file is 95 MB; the reader refuses these at the first missing tensor).
  std::filesystem::create_directories(corpus / "inception_weights");
  safetensors::Writer w;
  size_t k = 0;
  for (auto& [name, t] : inception().state_dict()) {
    if (++k > 5) break;
    w.add(name, t);
  }
  w.write((corpus / "inception_weights" / "seed-first5").string());
}

// name -> the reader, given the bytes.
inline const std::map<std::string, std::function<void(const uint8_t*, size_t)>>& readers() {
  static const std::map<std::string, std::function<void(const uint8_t*, size_t)>> r = {
      {"idx_images", [](const uint8_t* d, size_t n) { (void)read_idx_images(put("x-images-idx3-ubyte", d, n)); }},
      {"idx_images_gz", [](const uint8_t* d, size_t n) { (void)read_idx_images(put("x-images-idx3-ubyte.gz", d, n)); }},
      {"idx_labels", [](const uint8_t* d, size_t n) { (void)read_idx_labels(put("x-labels-idx1-ubyte", d, n)); }},
      {"npy", [](const uint8_t* d, size_t n) { (void)npy::load(put("x.npy", d, n)); }},
      {"npz", [](const uint8_t* d, size_t n) { (void)npy::load_npz(put("x.npz", d, n)); }},
      {"fid_stats", [](const uint8_t* d, size_t n) { (void)load_gaussian_stats(put("stats.npz", d, n)); }},
      {"safetensors", [](const uint8_t* d, size_t n) {
         const auto f = safetensors::File::read(put("x.safetensors", d, n));
         for (const std::string& name : f.names()) (void)f.tensor<float>(name);
         if (f.metadata().count("step")) (void)safetensors::metadata_number<int64_t>(f.metadata(), "step", f.path());
       }},
      {"png", [](const uint8_t* d, size_t n) {
         std::filesystem::create_directories(scratch() / "png");
         put("png/a.png", d, n);
         (void)load_image_folder((scratch() / "png").string());
       }},
      {"cifar_bin", [](const uint8_t* d, size_t n) { (void)load_cifar10_bin({put("data_batch_1.bin", d, n)}); }},
      {"cifar_archive", [](const uint8_t* d, size_t n) { (void)load_cifar10_archive(put("cifar.tar.gz", d, n)); }},
      {"checkpoint", [](const uint8_t* d, size_t n) {
         Generator g(1);
         ToyMLP<float> m(tiny_mlp(), g);
         Adam<float> opt(m.named_parameters(), AdamOptions{});
         EMA<float> ema(m.named_parameters(), 0.9);
         (void)load_checkpoint(put("checkpoint.safetensors", d, n), m, &opt, &ema);
       }},
      {"lenet", [](const uint8_t* d, size_t n) { (void)load_lenet(put("lenet.safetensors", d, n)); }},
      {"inception_weights", [](const uint8_t* d, size_t n) { load_fid_weights(put("inception.safetensors", d, n), inception()); }},
      {"image_points", [](const uint8_t* d, size_t n) { (void)data2d::load_image(put("shape.png", d, n)); }},
      {"csv_points", [](const uint8_t* d, size_t n) { (void)data2d::read_csv_points(put("points.csv", d, n)); }},
  };
  return r;
}

// One input through one reader: true when it was read, false (with the message) when refused.
inline bool try_read(const std::string& reader, const uint8_t* data, size_t size, std::string* why = nullptr) {
  try {
    readers().at(reader)(data, size);
    return true;
  } catch (const std::exception& e) {
    if (why) *why = e.what();  // a refusal: what a reader should do with a bad file
    return false;
  }
}

// The harness's contract: 0 whatever the reader made of the input.
inline int run(const std::string& reader, const uint8_t* data, size_t size) {
  (void)try_read(reader, data, size);
  return 0;
}

}  // namespace diffuse::fuzz
