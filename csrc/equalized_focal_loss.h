// What the CPU and CUDA kernels of equalized_focal_loss and equalized_quality_focal_loss share: the argument checks
// (the Python API checks first, with messages that name the arguments; these guard direct torch.ops calls) and the
// registered entry points, built from each backend's forward, backward and (where it has one) one-pass step
// (`quality` undefined for EFL).
#pragma once

#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace ltk::equalized_focal_loss {

// quality: undefined for EFL, the per-row soft target [N] for EQFL. Every tensor on `device`.
inline void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
                         const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale,
                         c10::DeviceType device) {
  LTK_CHECK_DEVICES(device, logits, labels, pos_neg, normalizer);
  LTK_CHECK_DIM(logits, 2);
  LTK_CHECK_DIM(labels, 1);
  LTK_CHECK_DIM(pos_neg, 1);
  TORCH_CHECK(labels.size(0) == logits.size(0), "labels must have ", logits.size(0), " entries (one per row of ",
              "logits), got ", labels.size(0));
  TORCH_CHECK(pos_neg.size(0) == logits.size(1), "pos_neg must have ", logits.size(1), " entries (one per class), got ",
              pos_neg.size(0));
  TORCH_CHECK(normalizer.numel() == 1, "normalizer must hold one value, got shape ", normalizer.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, "labels must be int64 or int32");
  TORCH_CHECK(at::isFloatingType(pos_neg.scalar_type()), "pos_neg must be a floating-point tensor");
  TORCH_CHECK(gamma_b >= 0 && (scale == 0 || gamma_b > 0), "gamma_b must be > 0 (or >= 0 with scale = 0), got ",
              gamma_b);
  if (quality.defined()) {
    LTK_CHECK_DEVICES(device, logits, quality);
    LTK_CHECK_DIM(quality, 1);
    TORCH_CHECK(quality.size(0) == logits.size(0), "quality must have ", logits.size(0), " entries (one per row of ",
                "logits), got ", quality.size(0));
    TORCH_CHECK(at::isFloatingType(quality.scalar_type()), "quality must be a floating-point tensor");
  }
}

using Forward = at::Tensor (*)(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
                               const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale,
                               double alpha, int64_t ignore_index);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor& grad_loss,
                                                                    const at::Tensor& logits, const at::Tensor& labels,
                                                                    const at::Tensor& quality,
                                                                    const at::Tensor& pos_neg,
                                                                    const at::Tensor& normalizer, double gamma_b,
                                                                    double scale, double alpha, int64_t ignore_index);
using Statistics = std::optional<at::Tensor>;  // pos_grad / neg_grad: read by the autograd formula only
// The training step's one pass: (loss, dL/dlogits for d(loss) = 1, pos_step, neg_step).
using Fused = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality, const at::Tensor& pos_neg,
    const at::Tensor& normalizer, double gamma_b, double scale, double alpha, int64_t ignore_index);

// The fused step from the forward and the backward, for a backend without a one-pass kernel.
template <Forward forward, Backward backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_from_parts(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality, const at::Tensor& pos_neg,
    const at::Tensor& normalizer, double gamma_b, double scale, double alpha, int64_t ignore_index) {
  at::Tensor loss = forward(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
  auto [grad, pos, neg] = backward(at::ones({}, loss.options()), logits, labels, quality, pos_neg, normalizer, gamma_b,
                                   scale, alpha, ignore_index);
  return {loss, grad, pos, neg};
}

// Registers the six ops of the family on one backend (call inside its TORCH_LIBRARY_IMPL block).
template <Forward forward, Backward backward, Fused fused = &fused_from_parts<forward, backward>>
void register_kernels(torch::Library& m) {
  m.impl("_equalized_focal_loss_fused",
         [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& pos_neg, const at::Tensor& normalizer,
            double gamma_b, double scale, double alpha, int64_t ignore_index, const Statistics&, const Statistics&) {
           return fused(logits, labels, at::Tensor(), pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
         });
  m.impl("_equalized_quality_focal_loss_fused",
         [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality, const at::Tensor& pos_neg,
            const at::Tensor& normalizer, double gamma_b, double scale, double alpha, int64_t ignore_index,
            const Statistics&, const Statistics&) {
           return fused(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
         });
  m.impl("equalized_focal_loss",
         [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& pos_neg, const at::Tensor& normalizer,
            double gamma_b, double scale, double alpha, int64_t ignore_index, const Statistics&, const Statistics&) {
           return forward(logits, labels, at::Tensor(), pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
         });
  m.impl("_equalized_focal_loss_backward",
         [](const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& pos_neg,
            const at::Tensor& normalizer, double gamma_b, double scale, double alpha, int64_t ignore_index) {
           return backward(grad_loss, logits, labels, at::Tensor(), pos_neg, normalizer, gamma_b, scale, alpha,
                           ignore_index);
         });
  m.impl("equalized_quality_focal_loss",
         [](const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality, const at::Tensor& pos_neg,
            const at::Tensor& normalizer, double gamma_b, double scale, double alpha, int64_t ignore_index,
            const Statistics&, const Statistics&) {
           return forward(logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha, ignore_index);
         });
  m.impl("_equalized_quality_focal_loss_backward",
         [](const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& quality,
            const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b, double scale, double alpha,
            int64_t ignore_index) {
           return backward(grad_loss, logits, labels, quality, pos_neg, normalizer, gamma_b, scale, alpha,
                           ignore_index);
         });
}

}  // namespace ltk::equalized_focal_loss
