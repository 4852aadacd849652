// Embedding: a table of num vectors of size dim, looked up by index (torch.nn.Embedding, with
// its N(0, 1) initialisation); the backward adds into the rows that were used.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/shape.hpp>

namespace diffuse {

template <class T>
class Embedding : public Module<T> {
 public:
  Embedding(int64_t num, int64_t dim, Generator& g) : num_(num), dim_(dim) {
    if (num < 1 || dim < 1) throw std::invalid_argument("diffuse: Embedding needs num >= 1 and dim >= 1");
    weight = this->register_parameter("weight", Tensor<T>::randn({num, dim}, g));
  }
  // ids: indices in [0, num) -> [ids.size(), dim] on the table's device.
  Var<T> operator()(const std::vector<int32_t>& ids) const {
    for (int32_t i : ids)
      if (i < 0 || i >= num_)
        throw std::out_of_range("diffuse: Embedding index " + std::to_string(i) + " outside [0, " + std::to_string(num_) + ")");
    return gather_rows(weight, ids);
  }
  int64_t num_embeddings() const { return num_; }
  int64_t embedding_dim() const { return dim_; }

  Var<T> weight;

 private:
  int64_t num_, dim_;
};

}  // namespace diffuse
