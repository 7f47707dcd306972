// What the CPU and CUDA kernels of seesaw_loss share: the argument checks (the Python API checks first, with
// messages that name the arguments; these guard direct torch.ops calls) and the per-class log counts.
#pragma once

#include "common.h"

namespace ltk::seesaw_loss {

inline void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& cum_samples,
                         const at::Tensor& normalizer, double p, double q, double eps, c10::DeviceType device) {
  LTK_CHECK_DEVICES(device, logits, labels, cum_samples, normalizer);
  LTK_CHECK_DIM(logits, 2);
  LTK_CHECK_DIM(labels, 1);
  LTK_CHECK_DIM(cum_samples, 1);
  TORCH_CHECK(logits.size(1) >= 3, "logits must have C + 2 >= 3 columns (classes, then 2 objectness), got ",
              logits.size(1));
  TORCH_CHECK(labels.size(0) == logits.size(0), "labels must have ", logits.size(0), " entries (one per row of ",
              "logits), got ", labels.size(0));
  TORCH_CHECK(cum_samples.size(0) == logits.size(1) - 1, "cum_samples must have C + 1 = ", logits.size(1) - 1,
              " entries, got ", cum_samples.size(0));
  TORCH_CHECK(normalizer.numel() == 1, "normalizer must hold one value, got shape ", normalizer.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, "labels must be int64 or int32");
  TORCH_CHECK(at::isFloatingType(cum_samples.scalar_type()), "cum_samples must be a floating-point tensor");
  TORCH_CHECK(p >= 0 && q >= 0, "p and q must be >= 0, got ", p, " and ", q);
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
}

// log(max(N_j, 1)) of the classes 1..C, [C] in the accumulation type: the mitigation factor's log is
// p * min(0, logn[j] - logn[l]).
inline at::Tensor log_counts(const at::Tensor& cum_samples, at::ScalarType acc) {
  return at::log(cum_samples.slice(0, 1).to(acc).clamp_min(1)).contiguous();
}

}  // namespace ltk::seesaw_loss
