// Software prefetch of the next row of a row-by-row kernel: a row costs a microsecond or more of arithmetic, and the
// hardware prefetchers alone leave the row's first loads stalling on memory (BAGS loss at 8192 x 1236 on 2 threads:
// 5-10% of its time); requesting the next row's lines (into L2) at the start of this one overlaps their latency with
// this row's work.
#pragma once

#include <cstdint>

namespace ltk::cpu {

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const char* end = reinterpret_cast<const char*>(row + n);
#if defined(__GNUC__)
  for (; p < end; p += 64) __builtin_prefetch(p, 0, 2);  // read, keep in L2 and outer levels
#else
  (void)p, (void)end;
#endif
}

}  // namespace ltk::cpu
