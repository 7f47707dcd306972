// Transparent huge pages for large fresh CPU outputs. The first write to a fresh output faults in every page, and on a
// busy VM that can cost more than the kernel itself (the 320 MB bool output of pasting 300 masks at 800 x 1333:
// ~130 ms of page faults in 4 KiB pages, ~40 ms in 2 MiB pages, 21 ms to write the same bytes again). Asking for huge
// pages before that first write (madvise MADV_HUGEPAGE, what PyTorch itself does for every allocation under
// THP_MEM_ALLOC_ENABLE=1) faults 512x fewer pages. Outputs above 32 MiB, glibc's largest mmap threshold, usually
// get a mapping of their own; where the allocator reuses a free range of its heap instead, the advice covers that
// range only, and its pages already faulted in stay as they are. It is advice only: where THP is off, or outside
// Linux, nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ltk::cpu {

// `fresh`: a tensor just allocated and not yet written. Returns it.
inline const at::Tensor& advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  constexpr size_t kMinBytes = size_t{32} << 20;
  const size_t n = fresh.nbytes();
  if (n < kMinBytes || !fresh.is_contiguous()) return fresh;
  const auto p = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t begin = (p + kHugePage - 1) & ~(kHugePage - 1), end = (p + n) & ~(kHugePage - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: no error
#endif
  return fresh;
}

}  // namespace ltk::cpu
