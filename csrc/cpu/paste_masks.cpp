// Mask pasting, CPU kernel (docs/spec.md §8, geometry in csrc/paste_masks_math.h).
// The work runs in parallel over the K x H output rows. A row outside its mask's box is one memset; inside, the
// columns left and right of the box are memsets and the columns in it take the bilinear value of the padded mask,
// so every output byte is written once and nothing of image size is allocated besides the output.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"
#include "cpu/huge_pages.h"
#include "paste_masks.h"
#include "paste_masks_math.h"

namespace {

using ltk::paste_masks::IntBox;
using ltk::paste_masks::Taps;

template <typename T, typename acc, typename B>
void paste(const T* masks, const B* boxes, int64_t K, int64_t M, int64_t H, int64_t W, double threshold, bool* out) {
  std::vector<IntBox> ib(K);
  const B scale = static_cast<B>(static_cast<double>(M + 2) / static_cast<double>(M));
  for (int64_t k = 0; k < K; ++k) ib[k] = ltk::paste_masks::expand_box<B>(boxes + 4 * k, scale);
  const acc thr = static_cast<acc>(threshold);
  const bool background = acc(0) > thr;
  const int64_t P = M + 2;
  at::parallel_for(0, K * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(W, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<Taps<acc>> tx;
    int64_t tx_mask = -1;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k = r / H, y = r % H;
      bool* row = out + r * W;
      const IntBox& b = ib[k];
      const int64_t xa = std::max<int64_t>(b.x0, 0), xb = std::min<int64_t>(b.x1 + 1, W);  // [xa, xb) in the box
      if (y < b.y0 || y > b.y1 || xa >= xb) {
        std::memset(row, background, W);
        continue;
      }
      if (tx_mask != k) {  // column taps of this mask, reused by its rows
        tx.resize(xb - xa);
        for (int64_t x = xa; x < xb; ++x) tx[x - xa] = ltk::paste_masks::taps<acc>(P, b.w, x - b.x0);
        tx_mask = k;
      }
      const Taps<acc> ty = ltk::paste_masks::taps<acc>(P, b.h, y - b.y0);
      const T* mask = masks + k * M * M;
      std::memset(row, background, xa);
      for (int64_t x = xa; x < xb; ++x) row[x] = ltk::paste_masks::value<T, acc>(mask, M, ty, tx[x - xa]) > thr;
      std::memset(row + xb, background, W - xb);
    }
  });
}

void paste_masks_into_cpu(const at::Tensor& masks, const at::Tensor& boxes, double threshold, const at::Tensor& out) {
  ltk::paste_masks::check_inputs(masks, boxes);
  ltk::paste_masks::check_out(masks, out);
  LTK_CHECK_DEVICES(at::kCPU, masks, boxes, out);
  const int64_t K = masks.size(0), M = masks.size(1), H = out.size(1), W = out.size(2);
  if (out.numel() == 0) return;
  const at::Tensor b = ltk::paste_masks::box_tensor(boxes);
  ltk::paste_masks::check_finite(b);
  const at::Tensor m = masks.contiguous();
  LTK_DISPATCH_FLOATING(m.scalar_type(), "paste_masks_cpu", [&] {
    using acc = ltk::acc_t<scalar_t>;
    if (b.scalar_type() == at::kDouble) {
      paste<scalar_t, acc, double>(m.const_data_ptr<scalar_t>(), b.const_data_ptr<double>(), K, M, H, W, threshold,
                                   out.mutable_data_ptr<bool>());
    } else {
      paste<scalar_t, acc, float>(m.const_data_ptr<scalar_t>(), b.const_data_ptr<float>(), K, M, H, W, threshold,
                                  out.mutable_data_ptr<bool>());
    }
  });
}

at::Tensor paste_masks_cpu(const at::Tensor& masks, const at::Tensor& boxes, int64_t height, int64_t width,
                           double threshold) {
  ltk::paste_masks::check_inputs(masks, boxes);
  ltk::paste_masks::check_size(height, width);
  at::Tensor out = at::empty({masks.size(0), height, width}, masks.options().dtype(at::kBool));
  ltk::cpu::advise_huge_pages(out);
  paste_masks_into_cpu(masks, boxes, threshold, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("paste_masks", &paste_masks_cpu);
  m.impl("paste_masks_into", &paste_masks_into_cpu);
}
