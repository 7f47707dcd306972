// Argument checks shared by the CPU and CUDA mask-pasting kernels (the Python API checks first, with messages that
// name the arguments; these guard direct calls of torch.ops.ltkernels.paste_masks*).
#pragma once

#include "common.h"

namespace ltk::paste_masks {

inline void check_inputs(const at::Tensor& masks, const at::Tensor& boxes) {
  TORCH_CHECK_VALUE(masks.dim() == 3 && masks.size(1) == masks.size(2),
                    "paste_masks: masks must have shape [K, M, M], got ", masks.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "paste_masks: boxes must have shape [K, 4], got ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(masks.size(0) == boxes.size(0),
                    "paste_masks: masks and boxes must hold the same number of "
                    "masks, got ",
                    masks.size(0), " and ", boxes.size(0));
  TORCH_CHECK_VALUE(masks.size(0) == 0 || masks.size(1) > 0, "paste_masks: masks must be at least 1 x 1, got ",
                    masks.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(masks.scalar_type()), "paste_masks: masks must be floating-point, got ",
                   masks.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(boxes.scalar_type()), "paste_masks: boxes must be floating-point, got ",
                   boxes.scalar_type());
  TORCH_CHECK_VALUE(masks.device() == boxes.device(), "paste_masks: masks and boxes must be on the same device, got ",
                    masks.device(), " and ", boxes.device());
}

inline void check_out(const at::Tensor& masks, const at::Tensor& out) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kBool, "paste_masks: out must be a bool tensor, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == masks.size(0), "paste_masks: out must have shape [", masks.size(0),
                    ", H, W], got ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "paste_masks: out must be contiguous");
  TORCH_CHECK_VALUE(out.device() == masks.device(), "paste_masks: out must be on the device of masks (", masks.device(),
                    "), got ", out.device());
}

inline void check_size(int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, "paste_masks: the image size must be non-negative, got (", height, ", ",
                    width, ")");
}

// Boxes in their arithmetic type: float32 or float64 as given; float16/bfloat16 are read as float32.
inline at::Tensor box_tensor(const at::Tensor& boxes) {
  const auto t = ltk::acc_type(boxes.scalar_type());
  return boxes.to(t).contiguous();
}

inline void check_finite(const at::Tensor& boxes) {
  TORCH_CHECK_VALUE(boxes.numel() == 0 || at::isfinite(boxes).all().item<bool>(),
                    "paste_masks: boxes must be finite (a NaN or infinite coordinate has no place on the image)");
}

}  // namespace ltk::paste_masks
