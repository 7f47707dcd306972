// Balanced Group Softmax (BAGS, docs/spec.md §1): schemas.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  // logits [N, K]; labels [N] int64 in 0..C (an ignored row may carry any label: it must be unselected everywhere);
  // selected [G + 1, N] bool (the rows taking part in each group); scale [G + 1] (float32, or float64 for float64
  // logits: 1 / |selected rows of g|, 0 for an empty group); label_targets [C + 1, G + 1] int64 (target column of
  // each label inside each group); group_offsets [G + 2] int64 (first column of groups 0..G, then K).
  // Returns (loss: 0-D, the sum over selected (row, group) of scale_g * (logsumexp_g - x[target]);
  //          grad [N, K]: d loss / d logits = scale_g * (softmax_g - onehot) on selected (row, group), else 0).
  m.def(
      "group_softmax_loss(Tensor logits, Tensor labels, Tensor selected, Tensor scale, Tensor label_targets, "
      "Tensor group_offsets) -> (Tensor, Tensor)");
  // logits [N, K]; group_offsets [G + 2]; label_group [C + 1]; score_column [C + 1] (logit column of each label).
  // Returns [N, C + 1]: out[:, 0] = softmax_0[0]; out[:, c] = softmax_{g(c)}[column c] * softmax_0[1].
  m.def(
      "group_softmax_scores(Tensor logits, Tensor group_offsets, Tensor label_group, Tensor score_column) "
      "-> Tensor");
}
