// Argument checks of the NMS family shared by the CPU and CUDA kernels (the Python API checks first, with messages
// that name the arguments; these guard direct calls of torch.ops.ltkernels.*).
#pragma once

#include "common.h"

namespace ltk::nms {

// The argument checks of nms and batched_nms on `device` (Python validates first; this is the safety net
// for direct torch.ops calls).
inline void check_boxes_scores(const at::Tensor& boxes, const at::Tensor& scores, c10::DeviceType device) {
  TORCH_CHECK(boxes.device().type() == device, "boxes must be a ", device, " tensor, got ", boxes.device());
  TORCH_CHECK(scores.device().type() == device, "scores must be a ", device, " tensor, got ", scores.device());
  LTK_CHECK_DIM(boxes, 2);
  TORCH_CHECK(boxes.size(1) == 4, "boxes must have shape [N, 4], got ", boxes.sizes());
  LTK_CHECK_DIM(scores, 1);
  TORCH_CHECK(boxes.size(0) == scores.size(0), "boxes and scores must have the same length, got ", boxes.size(0),
              " and ", scores.size(0));
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "boxes and scores must have the same dtype, got ",
              boxes.scalar_type(), " and ", scores.scalar_type());
  TORCH_CHECK(scores.device() == boxes.device(), "boxes and scores must be on the same device");
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "boxes must be floating point");
}

// The class index argument of batched_nms.
inline void check_idxs(const at::Tensor& idxs, const at::Tensor& boxes, c10::DeviceType device) {
  TORCH_CHECK(idxs.device().type() == device, "idxs must be a ", device, " tensor, got ", idxs.device());
  LTK_CHECK_DIM(idxs, 1);
  TORCH_CHECK(idxs.size(0) == boxes.size(0), "idxs must have one entry per box, got ", idxs.size(0), " for ",
              boxes.size(0), " boxes");
  TORCH_CHECK(!at::isFloatingType(idxs.scalar_type()) && idxs.scalar_type() != at::kBool,
              "idxs must be an integer tensor, got ", idxs.scalar_type());
}

// The kernels keep per-image bookkeeping: bounding num_images makes a wrong value an error instead of an
// allocation failure (ltkernels.MAX_IMAGES_PER_CALL).
constexpr int64_t kMaxImagesPerCall = int64_t{1} << 24;

// The arguments of multiclass_nms.
inline void check_multiclass_args(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& image_index,
                                  int64_t num_images, c10::DeviceType device) {
  TORCH_CHECK(boxes.device().type() == device, "boxes must be a ", device, " tensor, got ", boxes.device());
  TORCH_CHECK(scores.device().type() == device, "scores must be a ", device, " tensor, got ", scores.device());
  TORCH_CHECK(image_index.device().type() == device, "image_index must be a ", device, " tensor, got ",
              image_index.device());
  LTK_CHECK_DIM(scores, 2);
  TORCH_CHECK(boxes.device() == scores.device() && image_index.device() == scores.device(),
              "boxes, scores and image_index must be on the same device");
  const int64_t n = scores.size(0), C = scores.size(1);
  TORCH_CHECK((boxes.dim() == 2 && boxes.size(0) == n && boxes.size(1) == 4) ||
                  (boxes.dim() == 3 && boxes.size(0) == n && boxes.size(1) == C && boxes.size(2) == 4),
              "boxes must have shape [N, 4] or [N, C, 4] for scores of shape [N, C] = ", scores.sizes(), ", got ",
              boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "boxes and scores must have the same dtype");
  TORCH_CHECK(image_index.scalar_type() == at::kLong && image_index.dim() == 1 && image_index.size(0) == n,
              "image_index must be an int64 tensor of shape [N]");
  TORCH_CHECK(num_images >= 0 && num_images <= kMaxImagesPerCall, "num_images must lie in [0, ", kMaxImagesPerCall,
              "], got ", num_images);
}

// The arguments of multiclass_nms_images (the device is the backend's: the dispatcher picked it from the tensors).
inline void check_multiclass_images_args(at::TensorList boxes, at::TensorList scores) {
  TORCH_CHECK(!scores.empty() && boxes.size() == scores.size(),
              "boxes and scores must be lists with one entry per image (at least one), got ", boxes.size(), " and ",
              scores.size());
  TORCH_CHECK(static_cast<int64_t>(scores.size()) <= kMaxImagesPerCall, "at most ", kMaxImagesPerCall,
              " images per call, got ", scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor &b = boxes[i], &s = scores[i];
    TORCH_CHECK(s.dim() == 2, "scores[", i, "] must have shape [N, C], got ", s.sizes());
    const int64_t n = s.size(0), C = s.size(1);
    TORCH_CHECK(C == scores[0].size(1) && b.dim() == boxes[0].dim(),
                "every image must have the same number of classes and the same box layout");
    TORCH_CHECK((b.dim() == 2 && b.size(0) == n && b.size(1) == 4) ||
                    (b.dim() == 3 && b.size(0) == n && b.size(1) == C && b.size(2) == 4),
                "boxes[", i, "] must have shape [N, 4] or [N, C, 4] for scores of shape ", s.sizes(), ", got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == s.scalar_type() && s.scalar_type() == scores[0].scalar_type(),
                "boxes and scores of every image must have one dtype");
    TORCH_CHECK(b.device() == scores[0].device() && s.device() == scores[0].device(),
                "boxes and scores of every image must be on one device");
  }
}

}  // namespace ltk::nms
