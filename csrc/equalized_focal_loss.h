// Shape, dtype and parameter checks of equalized_focal_loss (and equalized_quality_focal_loss) shared by the CPU and CUDA kernels (device checks stay
// with each backend).
#pragma once

#include "common.h"

namespace ltk {

inline void check_equalized_focal_loss_args(const at::Tensor& logits, const at::Tensor& labels,
                                            const at::Tensor& pos_neg, const at::Tensor& normalizer, double gamma_b,
                                            double scale) {
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
}

// EQFL: EFL's checks plus the per-row quality [N] (the soft target of each positive row).
inline void check_equalized_quality_focal_loss_args(const at::Tensor& logits, const at::Tensor& labels,
                                                    const at::Tensor& quality, const at::Tensor& pos_neg,
                                                    const at::Tensor& normalizer, double gamma_b, double scale) {
  check_equalized_focal_loss_args(logits, labels, pos_neg, normalizer, gamma_b, scale);
  LTK_CHECK_DIM(quality, 1);
  TORCH_CHECK(quality.size(0) == logits.size(0), "quality must have ", logits.size(0), " entries (one per row of ",
              "logits), got ", quality.size(0));
  TORCH_CHECK(at::isFloatingType(quality.scalar_type()), "quality must be a floating-point tensor");
}

}  // namespace ltk
