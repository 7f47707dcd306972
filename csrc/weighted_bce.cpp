// Class-weighted sigmoid cross-entropy: EQL v2 (docs/spec.md §10) and the federated loss (§11). One pass computes the
// loss, dL/dlogits (the autograd backward scales the saved gradient) and, for EQL v2, the step's gradient statistics.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  // logits [N, C + 1] (column C: background; float32/float64/float16/bfloat16), labels [N] int64/int32 in
  // {ignore_index, 0..C}, pos_neg [C] (float, +inf allowed: weights 1), normalizer 0-d. Returns (loss 0-d float32, or
  // float64 for float64 logits; dL/dlogits [N, C + 1] in the logits' dtype; pos_step [C]; neg_step [C]): the steps
  // are the per-class sums of w * |p - t| over the targets 1 / 0 (float32, or float64 for float64 logits).
  m.def(
      "eqlv2_loss(Tensor logits, Tensor labels, Tensor pos_neg, Tensor normalizer, float gamma, float mu, "
      "float alpha, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
  // logits [N, C], labels as above, classes [C] (float: 1 in the sampled class set, 0 outside; any weights work),
  // normalizer 0-d. Returns (loss, dL/dlogits [N, C]).
  m.def(
      "federated_loss(Tensor logits, Tensor labels, Tensor classes, Tensor normalizer, int ignore_index) "
      "-> (Tensor, Tensor)");
}
