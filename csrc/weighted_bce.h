// What the CPU and CUDA kernels of eqlv2_loss and federated_loss share: the argument checks (the Python API checks
// first, with messages that name the arguments; these guard direct torch.ops calls), the per-class weights of each
// loss, and the two registered entry points built from one backend kernel.
#pragma once

#include <torch/library.h>

#include <tuple>

#include "common.h"

namespace ltk::weighted_bce {

// class_vector: pos_neg [C] (EQL v2, logits [N, C + 1]) or classes [C] (federated, logits [N, C]).
inline void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& class_vector,
                         const at::Tensor& normalizer, bool background_column, const char* vector_name,
                         c10::DeviceType device) {
  LTK_CHECK_DEVICES(device, logits, labels, class_vector, normalizer);
  LTK_CHECK_DIM(logits, 2);
  LTK_CHECK_DIM(labels, 1);
  TORCH_CHECK(class_vector.dim() == 1, vector_name, " must be 1-D, got shape ", class_vector.sizes());
  const int64_t c = logits.size(1) - (background_column ? 1 : 0);
  TORCH_CHECK(c >= 0, "logits must have C + 1 columns (classes, then background), got ", logits.size(1));
  TORCH_CHECK(labels.size(0) == logits.size(0), "labels must have ", logits.size(0), " entries (one per row of ",
              "logits), got ", labels.size(0));
  TORCH_CHECK(class_vector.size(0) == c, vector_name, " must have ", c, " entries (one per class), got ",
              class_vector.size(0));
  TORCH_CHECK(normalizer.numel() == 1, "normalizer must hold one value, got shape ", normalizer.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, "labels must be int64 or int32");
  TORCH_CHECK(at::isFloatingType(class_vector.scalar_type()), vector_name, " must be a floating-point tensor");
}

// EQL v2's weights [2, C + 1] (row 0: positive, row 1: negative) in `acc`: neg_w = sigmoid(gamma (g - mu)),
// pos_w = 1 + alpha (1 - neg_w), and 1, 1 for the background column.
inline at::Tensor eqlv2_weights(const at::Tensor& pos_neg, double gamma, double mu, double alpha, at::ScalarType acc) {
  auto neg = at::sigmoid((pos_neg.to(acc) - mu) * gamma);
  auto pos = 1 + alpha * (1 - neg);
  auto one = at::ones({1}, neg.options());
  return at::stack({at::cat({pos, one}), at::cat({neg, one})}).contiguous();
}

// The backend kernel: loss, dL/dlogits, and (when `statistics`) the [K] sums of w * |p - t| over targets 1 / 0.
// weights [2, K] in the accumulation type; background_column: the last column is background rows' target.
using Kernel = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& weights, const at::Tensor& normalizer,
    bool background_column, int64_t ignore_index, bool statistics);

template <Kernel kernel, c10::DeviceType device>
void register_kernels(torch::Library& m) {
  m.impl("eqlv2_loss", [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& pos_neg,
                          const at::Tensor& normalizer, double gamma, double mu, double alpha, int64_t ignore_index) {
    check_inputs(logits, labels, pos_neg, normalizer, true, "pos_neg", device);
    const int64_t c = pos_neg.size(0);
    auto w = eqlv2_weights(pos_neg, gamma, mu, alpha, acc_type(logits.scalar_type()));
    auto [loss, grad, pos, neg] = kernel(logits, labels, w, normalizer, true, ignore_index, true);
    return std::make_tuple(loss, grad, pos.slice(0, 0, c), neg.slice(0, 0, c));  // no statistics for background
  });
  m.impl("federated_loss", [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& classes,
                              const at::Tensor& normalizer, int64_t ignore_index) {
    check_inputs(logits, labels, classes, normalizer, false, "classes", device);
    auto w = classes.to(acc_type(logits.scalar_type())).unsqueeze(0).expand({2, classes.size(0)}).contiguous();
    auto out = kernel(logits, labels, w, normalizer, false, ignore_index, false);
    return std::make_tuple(std::get<0>(out), std::get<1>(out));
  });
}

}  // namespace ltk::weighted_bce
