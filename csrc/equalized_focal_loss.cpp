// Equalized Focal Loss (docs/spec.md §2): forward loss and a backward that also returns the per-class gradient
// statistics of that backward. The statistics buffers themselves are updated in Python (after an optional
// all-reduce), see ltkernels/ops/equalized_focal_loss.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  // logits [N, C] (float32/float64/float16/bfloat16), labels [N] int64/int32 in {ignore_index, 0..C},
  // pos_neg [C] (g_j), normalizer 0-d. Returns the 0-d loss (float32, or float64 for float64 logits).
  // pos_grad/neg_grad are not read by the kernel: they are the statistics buffers that this loss's autograd
  // backward accumulates into (together with pos_neg); None for a loss without statistics.
  m.def(
      "equalized_focal_loss(Tensor logits, Tensor labels, Tensor pos_neg, Tensor normalizer, float gamma_b, "
      "float scale, float alpha, int ignore_index, Tensor? pos_grad=None, Tensor? neg_grad=None) -> Tensor");
  // Returns (grad_logits [N, C] in the logits' dtype, pos_step [C], neg_step [C]): grad_logits already includes
  // grad_loss, and pos_step/neg_step are the sums of |grad_logits| over the positive / negative targets of every
  // class (float32, or float64 for float64 logits).
  m.def(
      "_equalized_focal_loss_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor pos_neg, "
      "Tensor normalizer, float gamma_b, float scale, float alpha, int ignore_index) -> (Tensor, Tensor, Tensor)");
  // A training step in one pass: (loss, grad_logits for grad_loss = 1, pos_step, neg_step); the autograd backward
  // scales the gradient and the statistics by the upstream gradient (and adds the statistics into pos_grad /
  // neg_grad, as the backward of equalized_focal_loss does).
  m.def(
      "_equalized_focal_loss_fused(Tensor logits, Tensor labels, Tensor pos_neg, Tensor normalizer, float gamma_b, "
      "float scale, float alpha, int ignore_index, Tensor? pos_grad=None, Tensor? neg_grad=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
