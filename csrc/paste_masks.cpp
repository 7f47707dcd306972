// Mask pasting (Mask R-CNN inference): K low-resolution mask probabilities [K, M, M] resized bilinearly into their
// boxes on an H x W image and thresholded, with the geometry of torchvision's `paste_masks_in_image` (one pixel of
// zero padding around each mask, the box widened by (M + 2) / M and truncated to integers; docs/spec.md §8).
// `paste_masks_into` writes into a caller's bool [K, H, W] buffer (a slice of a larger one, for chunked pasting).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ltkernels, m) {
  m.def("paste_masks(Tensor masks, Tensor boxes, SymInt height, SymInt width, float threshold) -> Tensor");
  m.def("paste_masks_into(Tensor masks, Tensor boxes, float threshold, Tensor(a!) out) -> ()");
}
