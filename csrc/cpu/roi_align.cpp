// RoIAlign CPU kernels (forward and deterministic backward).
//
// The bilinear sample grid of one bin is a tensor product (grid_h rows of samples x grid_w columns), and the
// out-of-range rule and the border clamps act on each axis separately, so the sum over a bin factorises:
//   out[k, c, ph, pw] = sum_r sum_x Wy[ph](r) * Wx[pw](x) * input[n, c, r, x]
// where Wy[ph](r) sums the row weights of every sample of bin row ph that touches pixel row r (divided by the
// sample count) and Wx[pw](x) likewise for columns. The per-RoI tables (`Axis`) cost O(PH * grid_h + PW * grid_w)
// instead of O(PH * PW * grid_h * grid_w), merge the taps that several samples share, and are reused for every
// channel. Two layouts of the work:
//  * channels-last (NHWC): each tap is one contiguous axpy over all channels (vectorised); used when the input is
//    channels-last already, or when the taps outnumber the input pixels enough to pay for one transposing copy.
//  * NCHW direct: channel planes read in place; for few RoIs on a large feature map.
// The forward runs in parallel over RoIs. The backward runs in parallel over channels: each thread owns a slice of
// grad_input and adds into it in a fixed order (RoI, bin, tap), so the gradient is deterministic and race-free.
// Accumulation is in float (double for float64 input).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/huge_pages.h"
#include "roi_align.h"
#include "roi_align_math.h"

namespace {

// ---- the vectorised inner loop ------------------------------------------------------------------------------
// y += a * x over n contiguous elements, compiled for AVX2+FMA and for the baseline ISA (LTK_CPU_CLONES).

LTK_CPU_CLONES void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
LTK_CPU_CLONES void axpy(double* __restrict y, double a, const double* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct Dims {
  int64_t K, N, C, H, W, PH, PW, sampling_ratio;
  bool aligned;
};

// Merged per-axis taps of every bin: entries [begin[p], begin[p + 1]) of (index, weight) for bin p.
template <typename acc>
struct Axis {
  std::vector<int64_t> begin, index;
  std::vector<acc> weight;

  void add(size_t first, int64_t idx, acc w) {
    if (w == acc(0)) return;
    // Samples move monotonically along the axis, so a repeated pixel is one of the last few entries.
    const size_t stop = index.size() > first + 3 ? index.size() - 3 : first;
    for (size_t j = index.size(); j-- > stop;) {
      if (index[j] == idx) {
        weight[j] += w;
        return;
      }
    }
    index.push_back(idx);
    weight.push_back(w);
  }

  void build(acc start, acc bin, int64_t pooled, int64_t grid, int64_t size, acc scale) {
    begin.assign(pooled + 1, 0);
    index.clear();
    weight.clear();
    for (int64_t p = 0; p < pooled; ++p) {
      const size_t first = index.size();
      for (int64_t i = 0; i < grid && size > 0; ++i) {
        int64_t lo, hi;
        acc l;
        if (!ltk::roi_align::axis_taps(ltk::roi_align::sample_pos(start, p, bin, i, grid), size, lo, hi, l)) continue;
        add(first, lo, (acc(1) - l) * scale);
        add(first, hi, l * scale);
      }
      begin[p + 1] = static_cast<int64_t>(index.size());
    }
  }
};

// Builds both tables of one RoI (the 1/count of the bin mean folded into the row weights); returns its batch index.
template <typename acc>
int64_t build_tables(Axis<acc>& ay, Axis<acc>& ax, const acc* roi, acc scale, const Dims& d) {
  const auto b = ltk::roi_align::box(roi, scale, d.PH, d.PW, d.sampling_ratio, d.aligned, int64_t{1} << 30);
  const acc inv_count = acc(1) / static_cast<acc>(std::max<int64_t>(b.grid_h * b.grid_w, 1));
  ay.build(b.start_h, b.bin_h, d.PH, b.grid_h, d.H, inv_count);
  ax.build(b.start_w, b.bin_w, d.PW, b.grid_w, d.W, acc(1));
  return static_cast<int64_t>(roi[0]);
}

// The rules of the Python API, so a compiled graph (which skips the Python checks) fails the same way: an integer
// batch index in [0, N), and an adaptive grid within ltk::roi_align::kMaxAdaptiveSamples per bin.
template <typename acc>
void check_rois(const acc* rois, acc scale, const Dims& d) {
  for (int64_t k = 0; k < d.K; ++k) {
    const acc* roi = rois + 5 * k;
    const acc b = roi[0];
    TORCH_CHECK(std::isfinite(b) && b == std::trunc(b) && b >= 0 && b < static_cast<acc>(d.N), "roi_align: rois[", k,
                ", 0] (the batch index) must be an integer in [0, ", d.N, "), got ", b);
    if (d.sampling_ratio > 0) continue;
    const acc offset = d.aligned ? acc(0.5) : acc(0);
    acc h = (roi[4] * scale - offset) - (roi[2] * scale - offset);
    acc w = (roi[3] * scale - offset) - (roi[1] * scale - offset);
    if (!d.aligned) {
      h = ltk::roi_align::at_least_one(h);
      w = ltk::roi_align::at_least_one(w);
    }
    TORCH_CHECK(!ltk::roi_align::adaptive_grid_too_large(h, w, d.PH, d.PW), "roi_align: the RoI at row ", k,
                " needs an adaptive sampling grid of more than ", ltk::roi_align::kMaxAdaptiveSamples,
                " samples per bin; clip the boxes to the image or pass sampling_ratio > 0");
  }
}

// Rough count of bilinear taps: is a transposing copy of the input (2 passes over N*C*H*W) worth it?
bool prefer_channels_last(int64_t K, int64_t PH, int64_t PW, int64_t sampling_ratio, int64_t N, int64_t H, int64_t W) {
  const double taps_per_bin = sampling_ratio > 0 ? 4.0 * sampling_ratio * sampling_ratio : 16.0;
  return static_cast<double>(K) * PH * PW * taps_per_bin >= 2.0 * N * H * W;
}

// The RoIs in the accumulation type, checked.
template <typename acc>
at::Tensor checked_rois(const at::Tensor& rois, acc scale, const Dims& d) {
  at::Tensor r = rois.to(c10::CppTypeToScalarType<acc>::value).contiguous();
  check_rois(r.const_data_ptr<acc>(), scale, d);
  return r;
}

// ---- forward ------------------------------------------------------------------------------------------------
template <typename T, typename acc>
void forward_channels_last(const acc* in /*[N,H,W,C]*/, const acc* rois, acc scale, T* out, const Dims& d) {
  at::parallel_for(0, d.K, 1, [&](int64_t k0, int64_t k1) {
    Axis<acc> ay, ax;
    const int64_t bins = d.PH * d.PW;
    std::vector<acc> tmp(bins * d.C);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t batch = build_tables(ay, ax, rois + 5 * k, scale, d);
      const acc* img = in + batch * d.H * d.W * d.C;
      std::fill(tmp.begin(), tmp.end(), acc(0));
      for (int64_t ph = 0; ph < d.PH; ++ph) {
        for (int64_t pw = 0; pw < d.PW; ++pw) {
          acc* t = tmp.data() + (ph * d.PW + pw) * d.C;
          for (int64_t i = ay.begin[ph]; i < ay.begin[ph + 1]; ++i) {
            const acc* row = img + ay.index[i] * d.W * d.C;
            const acc wy = ay.weight[i];
            for (int64_t j = ax.begin[pw]; j < ax.begin[pw + 1]; ++j) {
              axpy(t, wy * ax.weight[j], row + ax.index[j] * d.C, d.C);
            }
          }
        }
      }
      T* o = out + k * d.C * bins;
      for (int64_t c = 0; c < d.C; ++c) {
        for (int64_t b = 0; b < bins; ++b) o[c * bins + b] = static_cast<T>(tmp[b * d.C + c]);
      }
    }
  });
}

template <typename T, typename acc>
void forward_nchw(const T* in /*[N,C,H,W]*/, const acc* rois, acc scale, T* out, const Dims& d) {
  at::parallel_for(0, d.K, 1, [&](int64_t k0, int64_t k1) {
    Axis<acc> ay, ax;
    const int64_t bins = d.PH * d.PW;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t batch = build_tables(ay, ax, rois + 5 * k, scale, d);
      for (int64_t c = 0; c < d.C; ++c) {
        const T* plane = in + (batch * d.C + c) * d.H * d.W;
        T* o = out + (k * d.C + c) * bins;
        for (int64_t ph = 0; ph < d.PH; ++ph) {
          for (int64_t pw = 0; pw < d.PW; ++pw) {
            acc sum = 0;
            for (int64_t i = ay.begin[ph]; i < ay.begin[ph + 1]; ++i) {
              const T* row = plane + ay.index[i] * d.W;
              acc sx = 0;
              for (int64_t j = ax.begin[pw]; j < ax.begin[pw + 1]; ++j) {
                sx += ax.weight[j] * static_cast<acc>(row[ax.index[j]]);
              }
              sum += ay.weight[i] * sx;
            }
            o[ph * d.PW + pw] = static_cast<T>(sum);
          }
        }
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  ltk::roi_align::check_args(input, "input", rois, pooled_height, pooled_width, at::kCPU);
  const Dims d{rois.size(0),  input.size(0), input.size(1),  input.size(2), input.size(3),
               pooled_height, pooled_width,  sampling_ratio, aligned};
  at::Tensor out = at::empty({d.K, d.C, d.PH, d.PW}, input.options());
  ltk::cpu::advise_huge_pages(out);
  if (out.numel() == 0) return out;
  if (d.H == 0 || d.W == 0) return out.zero_();

  LTK_DISPATCH_FLOATING(input.scalar_type(), "roi_align_forward_cpu", [&] {
    using acc = ltk::acc_t<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc>::value;
    const acc scale = static_cast<acc>(spatial_scale);
    const at::Tensor rois_a = checked_rois<acc>(rois, scale, d);
    const acc* r = rois_a.const_data_ptr<acc>();
    const bool channels_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
    if (channels_last || prefer_channels_last(d.K, d.PH, d.PW, d.sampling_ratio, d.N, d.H, d.W)) {
      at::Tensor in = input;
      if (input.scalar_type() != acc_type || !input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
        const auto options = input.options().dtype(acc_type).memory_format(at::MemoryFormat::ChannelsLast);
        in = at::empty({d.N, d.C, d.H, d.W}, options);
        in.copy_(input);
      }
      forward_channels_last<scalar_t, acc>(in.const_data_ptr<acc>(), r, scale, out.mutable_data_ptr<scalar_t>(), d);
    } else {
      const at::Tensor in = input.contiguous();
      forward_nchw<scalar_t, acc>(in.const_data_ptr<scalar_t>(), r, scale, out.mutable_data_ptr<scalar_t>(), d);
    }
  });
  return out;
}

// ---- backward -----------------------------------------------------------------------------------------------
template <typename T, typename acc>
void backward_channels_last(const T* grad /*[K,C,PH,PW]*/, const acc* rois, acc scale, acc* gi /*[N,H,W,C]*/,
                            const Dims& d) {
  at::parallel_for(0, d.C, 16, [&](int64_t c0, int64_t c1) {
    Axis<acc> ay, ax;
    const int64_t nc = c1 - c0;
    const int64_t bins = d.PH * d.PW;
    std::vector<acc> gk(bins * nc);  // this RoI's gradient for this thread's channels, [bin][channel]
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t batch = build_tables(ay, ax, rois + 5 * k, scale, d);
      const T* src = grad + (k * d.C + c0) * bins;
      for (int64_t c = 0; c < nc; ++c) {
        for (int64_t b = 0; b < bins; ++b) gk[b * nc + c] = static_cast<acc>(src[c * bins + b]);
      }
      acc* img = gi + batch * d.H * d.W * d.C + c0;
      for (int64_t ph = 0; ph < d.PH; ++ph) {
        for (int64_t pw = 0; pw < d.PW; ++pw) {
          const acc* gb = gk.data() + (ph * d.PW + pw) * nc;
          for (int64_t i = ay.begin[ph]; i < ay.begin[ph + 1]; ++i) {
            acc* row = img + ay.index[i] * d.W * d.C;
            const acc wy = ay.weight[i];
            for (int64_t j = ax.begin[pw]; j < ax.begin[pw + 1]; ++j) {
              axpy(row + ax.index[j] * d.C, wy * ax.weight[j], gb, nc);
            }
          }
        }
      }
    }
  });
}

template <typename T, typename acc>
void backward_nchw(const T* grad /*[K,C,PH,PW]*/, const acc* rois, acc scale, acc* gi /*[N,C,H,W]*/, const Dims& d) {
  at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
    Axis<acc> ay, ax;
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t batch = build_tables(ay, ax, rois + 5 * k, scale, d);
      for (int64_t c = c0; c < c1; ++c) {
        acc* plane = gi + (batch * d.C + c) * d.H * d.W;
        const T* gk = grad + (k * d.C + c) * d.PH * d.PW;
        for (int64_t ph = 0; ph < d.PH; ++ph) {
          for (int64_t pw = 0; pw < d.PW; ++pw) {
            const acc gv = static_cast<acc>(gk[ph * d.PW + pw]);
            for (int64_t i = ay.begin[ph]; i < ay.begin[ph + 1]; ++i) {
              acc* row = plane + ay.index[i] * d.W;
              const acc a = gv * ay.weight[i];
              for (int64_t j = ax.begin[pw]; j < ax.begin[pw + 1]; ++j) row[ax.index[j]] += a * ax.weight[j];
            }
          }
        }
      }
    }
  });
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned,
                                  bool deterministic) {
  // `deterministic` changes nothing here: the CPU backward is always deterministic.
  ltk::roi_align::check_args(grad, "grad", rois, pooled_height, pooled_width, at::kCPU);
  ltk::roi_align::check_backward_sizes(grad, rois, pooled_height, pooled_width, batch_size, channels, height, width);
  const Dims d{rois.size(0), batch_size, channels, height, width, pooled_height, pooled_width, sampling_ratio, aligned};
  at::Tensor grad_input = at::zeros({d.N, d.C, d.H, d.W}, grad.options());
  if (grad.numel() == 0 || grad_input.numel() == 0) return grad_input;

  LTK_DISPATCH_FLOATING(grad.scalar_type(), "roi_align_backward_cpu", [&] {
    using acc = ltk::acc_t<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc>::value;
    const acc scale = static_cast<acc>(spatial_scale);
    const at::Tensor rois_a = checked_rois<acc>(rois, scale, d);
    const acc* r = rois_a.const_data_ptr<acc>();
    if (prefer_channels_last(d.K, d.PH, d.PW, d.sampling_ratio, d.N, d.H, d.W)) {
      const at::Tensor g = grad.contiguous();
      at::Tensor gi = at::zeros({d.N, d.H, d.W, d.C}, grad.options().dtype(acc_type));
      backward_channels_last<scalar_t, acc>(g.const_data_ptr<scalar_t>(), r, scale, gi.mutable_data_ptr<acc>(), d);
      grad_input.copy_(gi.permute({0, 3, 1, 2}));
    } else {
      const at::Tensor g = grad.contiguous();
      at::Tensor gi =
          grad.scalar_type() == acc_type ? grad_input : at::zeros({d.N, d.C, d.H, d.W}, grad.options().dtype(acc_type));
      backward_nchw<scalar_t, acc>(g.const_data_ptr<scalar_t>(), r, scale, gi.mutable_data_ptr<acc>(), d);
      if (!gi.is_same(grad_input)) grad_input.copy_(gi);
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("_roi_align_backward", &roi_align_backward_cpu);
}
