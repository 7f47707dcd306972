// RoIAlign (Mask R-CNN), same contract as torchvision.ops.roi_align. `rois` is [K, 5] = (batch index, x1, y1, x2, y2)
// in any floating dtype; the kernels read it in the accumulation type (float, or double for float64 input).
// `_roi_align_backward` takes `deterministic`: the CUDA kernels then gather instead of using atomics (the CPU kernels
// are always deterministic).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned, bool deterministic) -> Tensor");
}
