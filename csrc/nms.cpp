// Schemas of the NMS family: torchvision-compatible nms / batched_nms and the class-wise multi-class NMS of LVIS
// post-processing (every (row, class) score above a threshold is a candidate, NMS within each class, the best
// max_per_image survivors of each image). Kernels: csrc/cpu/nms.cpp, csrc/cuda/nms.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  // Indices (int64) of the kept boxes in decreasing score order (ties: lower index first), like torchvision.
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  // NMS within each value of idxs; kept indices in decreasing score order (ties: lower index first).
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // boxes [N, 4] or [N, C, 4], scores [N, C], image_index [N] int64 in [0, num_images).
  // Returns the detections of all images concatenated in image order, each image's in decreasing score order:
  // (boxes [K, 4], scores [K], labels [K] int64 in 1..C, row_index [K] int64 (row of the input), image [K] int64).
  // max_per_image < 0: no limit.
  m.def(
      "multiclass_nms(Tensor boxes, Tensor scores, Tensor image_index, int num_images, float score_threshold, "
      "float iou_threshold, int max_per_image) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
