// Seesaw loss (docs/spec.md §9): softmax cross-entropy over the classes with mitigation and compensation factors,
// plus the objectness cross-entropy, mmdetection's formulation. One pass computes the loss and dL/dlogits (the
// autograd backward scales the saved gradient).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  // logits [N, C + 2] (classes 1..C in columns 0..C-1, then the objectness "object" and "background" logits;
  // float32/float64/float16/bfloat16), labels [N] int64/int32 in {ignore_index, 0..C}, cum_samples [C + 1]
  // (per-label instance counts, entry 0 background; float), normalizer 0-d. Returns (loss 0-d float32, or float64 for
  // float64 logits; dL/dlogits [N, C + 2] in the logits' dtype).
  m.def(
      "seesaw_loss(Tensor logits, Tensor labels, Tensor cum_samples, Tensor normalizer, float p, float q, float eps, "
      "int ignore_index) -> (Tensor, Tensor)");
}
