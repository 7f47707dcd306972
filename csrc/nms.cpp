// Schemas of the NMS family: torchvision-compatible nms / batched_nms and the class-wise multi-class NMS of LVIS
// post-processing (every (row, class) score above a threshold is a candidate, NMS within each class, the best
// max_per_image survivors of each image). Kernels: csrc/cpu/nms.cpp, csrc/cuda/nms.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "nms.h"

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
  // The per-image form: boxes[i] [N_i, 4] or [N_i, C, 4], scores[i] [N_i, C] (one C, box layout, dtype and device
  // for all). Returns what multiclass_nms returns for the images concatenated, except that row_index is the row
  // within its image. The CPU kernel reads each image where it lies; other backends concatenate the images and call
  // multiclass_nms (the CompositeExplicitAutograd kernel below).
  m.def(
      "multiclass_nms_images(Tensor[] boxes, Tensor[] scores, float score_threshold, float iou_threshold, "
      "int max_per_image) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

#ifdef LTK_CUDA_EMU  // compiled again for the CPU emulation of the CUDA kernels: call that library's own op
constexpr const char* kMulticlassNms = "ltkernels_emu::multiclass_nms";
#else
constexpr const char* kMulticlassNms = "ltkernels::multiclass_nms";
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiclass_nms_images_concat(
    at::TensorList boxes, at::TensorList scores, double score_threshold, double iou_threshold, int64_t max_per_image) {
  ltk::nms::check_multiclass_images_args(boxes, scores);
  const int64_t num_images = static_cast<int64_t>(scores.size());
  const auto long_opts = scores[0].options().dtype(at::kLong);
  std::vector<int64_t> sizes(num_images), starts(num_images);
  for (int64_t i = 0, r = 0; i < num_images; r += sizes[i], ++i) sizes[i] = scores[i].size(0), starts[i] = r;
  const auto image_index = at::repeat_interleave(at::arange(num_images, long_opts),
                                                 at::tensor(sizes, long_opts.device(at::kCPU)).to(scores[0].device()));
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kMulticlassNms, "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double, int64_t)>();
  auto [b, s, labels, rows, images] =
      op.call(at::cat(boxes), at::cat(scores), image_index, num_images, score_threshold, iou_threshold, max_per_image);
  const auto first_row = at::tensor(starts, long_opts.device(at::kCPU)).to(scores[0].device());
  return {b, s, labels, rows - first_row.index_select(0, images), images};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CompositeExplicitAutograd, m) {
  m.impl("multiclass_nms_images", &multiclass_nms_images_concat);
}
