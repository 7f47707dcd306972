// Equalized Quality Focal Loss (the EFL paper's variant for IoU-aware one-stage detectors): EFL with a soft target
// on each positive row's label column, y' = quality[i] (the IoU of the sample), and 0 elsewhere. The kernels are
// EFL's (csrc/cpu/equalized_focal_loss.cpp, csrc/cuda/equalized_focal_loss.cu) with the positive column's term
// from csrc/equalized_focal_loss_math.h; the statistics are the same per-class sums of |dL/dx|.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  // quality [N] floating, in [0, 1] on positive rows (not read elsewhere); no gradient flows into it.
  m.def(
      "equalized_quality_focal_loss(Tensor logits, Tensor labels, Tensor quality, Tensor pos_neg, "
      "Tensor normalizer, float gamma_b, float scale, float alpha, int ignore_index, Tensor? pos_grad=None, "
      "Tensor? neg_grad=None) -> Tensor");
  m.def(
      "_equalized_quality_focal_loss_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor quality, "
      "Tensor pos_neg, Tensor normalizer, float gamma_b, float scale, float alpha, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_equalized_quality_focal_loss_fused(Tensor logits, Tensor labels, Tensor quality, Tensor pos_neg, "
      "Tensor normalizer, float gamma_b, float scale, float alpha, int ignore_index, Tensor? pos_grad=None, "
      "Tensor? neg_grad=None) -> (Tensor, Tensor, Tensor, Tensor)");
}
