// Argument checks of roi_align and _roi_align_backward shared by the CPU and CUDA kernels (the Python API checks
// first, with messages that name the arguments; these guard direct calls of torch.ops.ltkernels.*).
#pragma once

#include "common.h"

namespace ltk::roi_align {

// The checks forward and backward share; `t` is the input or the incoming gradient, on `device`.
inline void check_args(const at::Tensor& t, const char* name, const at::Tensor& rois, int64_t pooled_height,
                       int64_t pooled_width, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be a ", device, " tensor, got ", t.device());
  TORCH_CHECK(rois.device() == t.device(), "rois must be on ", t.device(), ", got ", rois.device());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), "rois must be a floating-point tensor, got ", rois.scalar_type());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "pooled_height and pooled_width must be positive, got ",
              pooled_height, " and ", pooled_width);
}

// The backward's input sizes and the shape of its incoming gradient.
inline void check_backward_sizes(const at::Tensor& grad, const at::Tensor& rois, int64_t pooled_height,
                                 int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t height,
                                 int64_t width) {
  TORCH_CHECK(batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0, "input sizes must be non-negative");
  TORCH_CHECK(grad.size(0) == rois.size(0) && grad.size(1) == channels && grad.size(2) == pooled_height &&
                  grad.size(3) == pooled_width,
              "grad must have shape [", rois.size(0), ", ", channels, ", ", pooled_height, ", ", pooled_width,
              "], got ", grad.sizes());
}

}  // namespace ltk::roi_align
