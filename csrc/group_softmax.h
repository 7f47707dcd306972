// Shape and dtype checks of group_softmax_loss shared by the CPU and CUDA kernels (device checks stay with each).
#pragma once

#include "common.h"

namespace ltk {

inline void check_group_softmax_loss_args(const at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& selected, const at::Tensor& scale,
                                          const at::Tensor& label_targets, const at::Tensor& group_offsets) {
  LTK_CHECK_DIM(logits, 2);
  LTK_CHECK_DIM(labels, 1);
  LTK_CHECK_DIM(selected, 2);
  LTK_CHECK_DIM(scale, 1);
  LTK_CHECK_DIM(label_targets, 2);
  const int64_t N = logits.size(0), G1 = group_offsets.size(0) - 1;
  TORCH_CHECK(labels.size(0) == N && labels.scalar_type() == at::kLong, "labels must be int64 [N] = [", N, "]");
  TORCH_CHECK(selected.size(0) == G1 && selected.size(1) == N && selected.scalar_type() == at::kBool,
              "selected must be bool [G + 1, N] = [", G1, ", ", N, "], got ", selected.sizes());
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.size(0) == G1 && scale.scalar_type() == acc_type, "scale must be ", acc_type, " [G + 1] = [",
              G1, "] for ", logits.scalar_type(), " logits");
  TORCH_CHECK(label_targets.size(1) == G1 && label_targets.scalar_type() == at::kLong,
              "label_targets must be int64 [C + 1, G + 1]");
}

}  // namespace ltk
