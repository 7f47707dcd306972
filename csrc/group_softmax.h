// Argument handling of group_softmax_loss shared by the CPU and CUDA kernels: the shape and dtype checks, the
// contiguous inputs and the allocated outputs (device checks, and on CPU the checks that read the data, stay with
// each backend).
#pragma once

#include <tuple>

#include "common.h"

namespace ltk::group_softmax {

// group_offsets [G + 2] int64 (its values are checked by the CPU kernels, which read them anyway).
inline void check_offsets_shape(const at::Tensor& group_offsets) {
  TORCH_CHECK(group_offsets.dim() == 1 && group_offsets.size(0) >= 2, "group_offsets must be 1-D with >= 2 entries");
  TORCH_CHECK(group_offsets.scalar_type() == at::kLong, "group_offsets must be int64");
}

inline void check_scores_args(const at::Tensor& logits, const at::Tensor& group_offsets, const at::Tensor& label_group,
                              const at::Tensor& score_column) {
  LTK_CHECK_DIM(logits, 2);
  check_offsets_shape(group_offsets);
  LTK_CHECK_DIM(label_group, 1);
  LTK_CHECK_DIM(score_column, 1);
  TORCH_CHECK(label_group.size(0) == score_column.size(0), "label_group and score_column must have C + 1 entries");
  TORCH_CHECK(label_group.scalar_type() == at::kLong && score_column.scalar_type() == at::kLong,
              "label_group and score_column must be int64");
}

inline void check_loss_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& selected,
                            const at::Tensor& scale, const at::Tensor& label_targets, const at::Tensor& group_offsets) {
  LTK_CHECK_DIM(logits, 2);
  check_offsets_shape(group_offsets);
  LTK_CHECK_DIM(labels, 1);
  LTK_CHECK_DIM(selected, 2);
  LTK_CHECK_DIM(scale, 1);
  LTK_CHECK_DIM(label_targets, 2);
  const int64_t N = logits.size(0), G1 = group_offsets.size(0) - 1;
  TORCH_CHECK(labels.size(0) == N && labels.scalar_type() == at::kLong, "labels must be int64 [N] = [", N, "]");
  TORCH_CHECK(selected.size(0) == G1 && selected.size(1) == N && selected.scalar_type() == at::kBool,
              "selected must be bool [G + 1, N] = [", G1, ", ", N, "], got ", selected.sizes());
  const auto acc_type = ltk::acc_type(logits.scalar_type());
  TORCH_CHECK(scale.size(0) == G1 && scale.scalar_type() == acc_type, "scale must be ", acc_type, " [G + 1] = [", G1,
              "] for ", logits.scalar_type(), " logits");
  TORCH_CHECK(label_targets.size(1) == G1 && label_targets.scalar_type() == at::kLong,
              "label_targets must be int64 [C + 1, G + 1]");
}

// group_softmax_loss's inputs, checked and contiguous, with its outputs allocated on the logits' device:
// grad [N, K] in the logits' dtype and row_loss [N] in the accumulation dtype (float64 for float64 logits, else
// float32), summed by loss_result().
// The caller has checked that logits is 2-D and group_offsets 1-D. `alloc_grad` (null: a fresh tensor) gives the
// uninitialised contiguous gradient for the checked logits.
struct LossArgs {
  at::Tensor logits, labels, selected, scale, label_targets, group_offsets;
  at::Tensor grad, row_loss;
  int64_t N = 0, K = 0, G1 = 0;

  LossArgs(const at::Tensor& logits_, const at::Tensor& labels_, const at::Tensor& selected_, const at::Tensor& scale_,
           const at::Tensor& label_targets_, const at::Tensor& group_offsets_,
           at::Tensor (*alloc_grad)(const at::Tensor&) = nullptr) {
    check_loss_args(logits_, labels_, selected_, scale_, label_targets_, group_offsets_);
    N = logits_.size(0);
    K = logits_.size(1);
    G1 = group_offsets_.size(0) - 1;
    const auto acc_type = ltk::acc_type(logits_.scalar_type());
    logits = logits_.contiguous();
    labels = labels_.contiguous();
    selected = selected_.contiguous();
    scale = scale_.contiguous();
    label_targets = label_targets_.contiguous();
    group_offsets = group_offsets_.contiguous();
    grad = alloc_grad ? alloc_grad(logits) : at::empty_like(logits, at::MemoryFormat::Contiguous);
    row_loss = at::empty({N}, logits.options().dtype(acc_type));
  }

  // (loss: the sum of the row losses, 0-D in the logits' dtype; grad)
  std::tuple<at::Tensor, at::Tensor> loss_result() const { return {row_loss.sum().to(logits.scalar_type()), grad}; }
};

}  // namespace ltk::group_softmax
