// The scheduler of the CUDA emulation (interface: csrc/emu/cuda_emu.h).
//
// A grid's blocks run in parallel on torch's intra-op threads (at::parallel_for), so global memory and its atomics
// behave as on a GPU. A block runs on one OS thread; each of its CUDA threads is a fiber (Boost.Context) that runs
// until it reaches a sync point or returns. When no thread can run, the scheduler completes what is complete: a warp
// op once every lane of its mask has arrived, then a block barrier once every live thread waits at it. Between two
// sync points the threads run in forward, reverse or a seeded random order (the configured `order`), which makes
// most missing-barrier races visible in one of the three. Shared memory is poisoned (0xFF bytes: NaN) before each
// block. Every misuse is an error naming the kernel, its launch site, the block, the thread and the source line.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>
#include <boost/context/fiber.hpp>
#include <boost/context/stack_context.hpp>

#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/cuda/CUDAContext.h>

#include "emu/runtime.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace ltk_emu {
namespace ctx = boost::context;

namespace {

constexpr size_t kSharedLimit = 48 * 1024;  // static + dynamic, without the opt-in attribute
constexpr size_t kStackSize = 256 * 1024;

Config g_config;
std::mutex g_config_mutex;
DeviceProp g_prop{};
std::atomic<int64_t> g_launches{0}, g_blocks{0}, g_threads{0}, g_syncs{0};

const char* sync_name(Sync s) {
  switch (s) {
    case Sync::Barrier: return "__syncthreads";
    case Sync::BarrierOr: return "__syncthreads_or";
    case Sync::BarrierAnd: return "__syncthreads_and";
    case Sync::BarrierCount: return "__syncthreads_count";
    case Sync::WarpSync: return "__syncwarp";
    case Sync::ShflIdx: return "__shfl_sync";
    case Sync::ShflUp: return "__shfl_up_sync";
    case Sync::ShflDown: return "__shfl_down_sync";
    case Sync::ShflXor: return "__shfl_xor_sync";
    case Sync::Ballot: return "__ballot_sync";
    case Sync::Any: return "__any_sync";
    case Sync::All: return "__all_sync";
  }
  return "?";
}
bool is_barrier(Sync s) { return s <= Sync::BarrierCount; }

// Stacks with a guard page below them, kept per OS thread and reused by the next block.
struct StackPool {
  std::vector<void*> free;
  ~StackPool() {
    for (void* p : free) munmap(p, kStackSize + static_cast<size_t>(getpagesize()));
  }
  ctx::stack_context allocate() {
    void* base;
    const size_t guard = static_cast<size_t>(getpagesize());
    if (!free.empty()) {
      base = free.back();
      free.pop_back();
    } else {
      base = mmap(nullptr, kStackSize + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(base != MAP_FAILED, "CUDA emulation: cannot map a thread stack");
      mprotect(base, guard, PROT_NONE);
    }
    ctx::stack_context sc;
    sc.size = kStackSize;
    sc.sp = static_cast<char*>(base) + guard + kStackSize;
    return sc;
  }
  void release(ctx::stack_context& sc) {
    free.push_back(static_cast<char*>(sc.sp) - kStackSize - static_cast<size_t>(getpagesize()));
  }
};
thread_local StackPool t_stacks;

struct PoolAllocator {
  ctx::stack_context allocate() { return t_stacks.allocate(); }
  void deallocate(ctx::stack_context& sc) noexcept { t_stacks.release(sc); }
};

struct AssertFailure {
  std::string what;
};

enum class State { Ready, Waiting, Done };

struct Thread {
  uint3 tid;
  int linear = 0;
  State state = State::Ready;
  ctx::fiber fiber;  // the thread, while the scheduler runs; the scheduler, while the thread runs
  // the pending sync point
  Sync kind = Sync::Barrier;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0, width = 0;
  std::source_location loc;
  uint64_t result = 0;
  std::exception_ptr error;
};

struct Block {
  const LaunchInfo* info;
  uint3 bid;
  int64_t linear;
  std::vector<Thread> threads;
  Thread* current = nullptr;
  std::vector<unsigned char> smem;  // dynamic shared memory, exactly the launch's size
  std::unique_ptr<unsigned char[]> arena{new unsigned char[kSharedLimit]};  // static shared memory
  std::vector<std::pair<const void*, size_t>> sites;
  size_t arena_used = 0;
};
thread_local Block* t_block = nullptr;

std::string where(const Block& b, const Thread* t) {
  std::ostringstream s;
  s << "CUDA emulation: kernel " << b.info->kernel << " (launched at " << b.info->file << ":" << b.info->line
    << "), block (" << b.bid.x << "," << b.bid.y << "," << b.bid.z << ")";
  if (t) s << ", thread (" << t->tid.x << "," << t->tid.y << "," << t->tid.z << ")";
  return s.str();
}
std::string at_line(const Thread& t) {
  std::ostringstream s;
  s << sync_name(t.kind) << " at " << t.loc.file_name() << ":" << t.loc.line();
  return s.str();
}
[[noreturn]] void fail(const Block& b, const Thread* t, const std::string& what) {
  TORCH_CHECK(false, where(b, t), ": ", what);
}

Block& current_block(const char* what) {
  TORCH_CHECK(t_block != nullptr && t_block->current != nullptr, "CUDA emulation: ", what, " called outside a kernel");
  return *t_block;
}

// Completes the warp op of `t` if every lane of its mask has arrived at the same op; false if some have not yet.
bool try_complete_warp(Block& b, Thread& t) {
  const int nthreads = static_cast<int>(b.threads.size());
  const int warp = t.linear / 32, lane = t.linear % 32;
  if (!((t.mask >> lane) & 1u)) fail(b, &t, at_line(t) + ": the mask leaves out the calling lane");
  for (int l = 0; l < 32; ++l) {
    if (!((t.mask >> l) & 1u)) continue;
    const int i = warp * 32 + l;
    if (i >= nthreads)
      fail(b, &t, at_line(t) + ": the mask names lane " + std::to_string(l) + ", which the block does not have");
    const Thread& o = b.threads[i];
    if (o.state == State::Done)
      fail(b, &t, at_line(t) + ": the mask names lane " + std::to_string(l) + ", which has exited");
    if (o.state != State::Waiting || is_barrier(o.kind)) return false;
    if (o.kind != t.kind || o.mask != t.mask || o.width != t.width)
      fail(b, &t, at_line(t) + " meets lane " + std::to_string(l) + " at " + at_line(o) + " (another op or mask)");
  }
  const int width =
      t.kind == Sync::WarpSync || t.kind == Sync::Ballot || t.kind == Sync::Any || t.kind == Sync::All ? 32 : t.width;
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail(b, &t, at_line(t) + ": width " + std::to_string(width) + " is not a power of 2 in 1..32");
  uint64_t votes = 0;
  for (int l = 0; l < 32; ++l)
    if (((t.mask >> l) & 1u) && b.threads[warp * 32 + l].value != 0) votes |= 1ull << l;
  for (int l = 0; l < 32; ++l) {
    if (!((t.mask >> l) & 1u)) continue;
    Thread& o = b.threads[warp * 32 + l];
    const int base = (l / width) * width;
    int src = l;
    switch (o.kind) {
      case Sync::ShflIdx: src = base + ((o.arg % width) + width) % width; break;
      case Sync::ShflUp: src = l - o.arg >= base ? l - o.arg : l; break;
      case Sync::ShflDown: src = l + o.arg < base + width ? l + o.arg : l; break;
      case Sync::ShflXor: src = (l ^ o.arg) < base + width ? (l ^ o.arg) : l; break;
      default: break;
    }
    switch (o.kind) {
      case Sync::ShflIdx:
      case Sync::ShflUp:
      case Sync::ShflDown:
      case Sync::ShflXor:
        if (src < 0 || src >= 32 || !((t.mask >> src) & 1u))
          fail(b, &o, at_line(o) + ": reads lane " + std::to_string(src) + ", which is not in the mask");
        o.result = b.threads[warp * 32 + src].value;
        break;
      case Sync::Ballot: o.result = votes; break;
      case Sync::Any: o.result = votes != 0; break;
      case Sync::All: o.result = votes == static_cast<uint64_t>(t.mask); break;
      default: o.result = 0; break;
    }
  }
  for (int l = 0; l < 32; ++l)
    if ((t.mask >> l) & 1u) b.threads[warp * 32 + l].state = State::Ready;
  return true;
}

// Releases a block barrier if every live thread waits at it.
bool try_complete_barrier(Block& b) {
  const Thread* first = nullptr;
  const Thread* exited = nullptr;
  int64_t count = 0;
  for (const Thread& t : b.threads) {
    if (t.state == State::Done) {
      exited = exited ? exited : &t;
      continue;
    }
    if (!is_barrier(t.kind)) return false;  // a warp op still pending: the caller reports the deadlock
    if (!first) {
      first = &t;
    } else if (t.kind != first->kind || t.loc.line() != first->loc.line() ||
               std::strcmp(t.loc.file_name(), first->loc.file_name()) != 0) {
      fail(b, &t,
           "barrier divergence: waits at " + at_line(t) + " while thread (" + std::to_string(first->tid.x) + "," +
               std::to_string(first->tid.y) + "," + std::to_string(first->tid.z) + ") waits at " + at_line(*first));
    }
    count += t.value != 0;
  }
  if (!first) return false;
  if (exited) fail(b, exited, "barrier divergence: exited while other threads wait at " + at_line(*first));
  const int64_t live = static_cast<int64_t>(b.threads.size());
  uint64_t r = 0;
  switch (first->kind) {
    case Sync::BarrierOr: r = count > 0; break;
    case Sync::BarrierAnd: r = count == live; break;
    case Sync::BarrierCount: r = static_cast<uint64_t>(count); break;
    default: break;
  }
  for (Thread& t : b.threads) {
    t.result = r;
    t.state = State::Ready;
  }
  return true;
}

[[noreturn]] void deadlock(Block& b) {
  std::ostringstream s;
  s << "deadlock: no sync point can complete;";
  int shown = 0;
  for (const Thread& t : b.threads) {
    if (t.state != State::Waiting || shown >= 4) continue;
    s << " thread (" << t.tid.x << "," << t.tid.y << "," << t.tid.z << ") waits at " << at_line(t) << ";";
    ++shown;
  }
  fail(b, nullptr, s.str());
}

void run_block(const LaunchInfo& info, void (*body)(const void*), const void* cbody, int64_t linear, uint3 bid,
               const Config& cfg) {
  Block b;
  b.info = &info;
  b.bid = bid;
  b.linear = linear;
  b.smem.assign(info.smem, 0xFF);
  const unsigned nx = info.block.x, ny = info.block.y, nz = info.block.z;
  const int n = static_cast<int>(nx * ny * nz);
  b.threads.resize(n);
  Block* outer = t_block;
  t_block = &b;
  blockIdx = bid;
  blockDim = info.block;
  gridDim = info.grid;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.linear = i;
    const unsigned u = static_cast<unsigned>(i);
    t.tid = uint3{u % nx, (u / nx) % ny, u / (nx * ny)};
    t.fiber = ctx::fiber(std::allocator_arg, PoolAllocator(), [&t, body, cbody](ctx::fiber&& sched) {
      t.fiber = std::move(sched);
      try {
        body(cbody);
      } catch (const ctx::detail::forced_unwind&) {
        throw;
      } catch (...) {
        t.error = std::current_exception();
      }
      t.state = State::Done;
      return std::move(t.fiber);
    });
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (cfg.order == Order::Reverse) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(cfg.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(linear));
  int64_t syncs = 0;
  try {
    for (;;) {
      if (cfg.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
      bool live = false;
      for (int i : order) {
        Thread& t = b.threads[i];
        if (t.state != State::Ready) continue;
        threadIdx = t.tid;
        b.current = &t;
        t.fiber = std::move(t.fiber).resume();
        b.current = nullptr;
        if (t.error) {
          try {
            std::rethrow_exception(t.error);
          } catch (const AssertFailure& a) {
            fail(b, &t, a.what);
          } catch (const std::exception& e) {
            fail(b, &t, std::string("exception in the kernel: ") + e.what());
          }
        }
      }
      for (const Thread& t : b.threads) live = live || t.state != State::Done;
      if (!live) break;
      ++syncs;
      bool progress = false;
      for (Thread& t : b.threads)
        if (t.state == State::Waiting && !is_barrier(t.kind)) progress = try_complete_warp(b, t) || progress;
      if (!progress) progress = try_complete_barrier(b);
      if (!progress) deadlock(b);
    }
  } catch (...) {
    t_block = outer;
    throw;  // ~Block unwinds the threads still suspended (Boost.Context's forced unwinding)
  }
  t_block = outer;
  g_syncs += syncs;
}

}  // namespace

uint64_t sync_point(Sync kind, unsigned mask, uint64_t value, int arg, int width, const Loc& loc) {
  Block& b = current_block(sync_name(kind));
  Thread& t = *b.current;
  t.kind = kind;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = width;
  t.loc = loc;
  t.state = State::Waiting;
  t.fiber = std::move(t.fiber).resume();  // back to the scheduler until the op completes
  return t.result;
}

void kernel_assert_fail(const char* cond, const char* file, int line) {
  std::ostringstream s;
  s << "device-side assertion `" << cond << "` failed at " << file << ":" << line;
  if (t_block == nullptr || t_block->current == nullptr) TORCH_CHECK(false, "CUDA emulation: ", s.str());
  throw AssertFailure{s.str()};
}

void* static_shared(size_t bytes, size_t align, const void* site) {
  Block& b = current_block("a __shared__ declaration");
  for (const auto& [s, off] : b.sites)
    if (s == site) return b.arena.get() + off;
  const size_t off = (b.arena_used + align - 1) / align * align;
  if (off + bytes + b.smem.size() > kSharedLimit)
    fail(b, b.current,
         "static (" + std::to_string(off + bytes) + " B) plus dynamic (" + std::to_string(b.smem.size()) +
             " B) shared memory exceed 48 KiB");
  b.arena_used = off + bytes;
  b.sites.emplace_back(site, off);
  std::memset(b.arena.get() + off, 0xFF, bytes);  // poison: NaN until written
  return b.arena.get() + off;
}

void* dynamic_shared() {
  Block& b = current_block("extern __shared__");
  return b.smem.empty() ? nullptr : b.smem.data();
}

void run_grid(const LaunchInfo& info, void (*body)(const void*), const void* cbody) {
  const dim3 g = info.grid, k = info.block;
  const uint64_t threads = static_cast<uint64_t>(k.x) * k.y * k.z;
  std::ostringstream site;
  site << "CUDA emulation: invalid launch of " << info.kernel << " at " << info.file << ":" << info.line << ": ";
  TORCH_CHECK(g.x > 0 && g.y > 0 && g.z > 0, site.str(), "grid (", g.x, ",", g.y, ",", g.z, ") has a zero dimension");
  TORCH_CHECK(g.x <= 0x7fffffffu && g.y <= 65535 && g.z <= 65535, site.str(), "grid (", g.x, ",", g.y, ",", g.z,
              ") exceeds (2^31-1, 65535, 65535)");
  TORCH_CHECK(k.x > 0 && k.y > 0 && k.z > 0, site.str(), "block (", k.x, ",", k.y, ",", k.z, ") has a zero dimension");
  TORCH_CHECK(k.x <= 1024 && k.y <= 1024 && k.z <= 64 && threads <= 1024, site.str(), "block (", k.x, ",", k.y, ",",
              k.z, ") exceeds 1024 threads or (1024, 1024, 64)");
  TORCH_CHECK(info.smem <= kSharedLimit, site.str(), info.smem, " B of dynamic shared memory exceed 48 KiB");
  const Config cfg = config();
  const int64_t nblocks = static_cast<int64_t>(g.x) * g.y * g.z;
  std::vector<int64_t> perm;  // which block each position of the run order executes
  if (cfg.order != Order::Forward) {
    perm.resize(nblocks);
    std::iota(perm.begin(), perm.end(), int64_t{0});
    if (cfg.order == Order::Reverse)
      std::reverse(perm.begin(), perm.end());
    else
      std::shuffle(perm.begin(), perm.end(), std::mt19937_64(cfg.seed ^ 0xB10C5ull));
  }
  ++g_launches;
  g_blocks += nblocks;
  g_threads += nblocks * static_cast<int64_t>(threads);
  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t i = perm.empty() ? p : perm[p];
      const uint3 bid{static_cast<unsigned>(i % g.x), static_cast<unsigned>((i / g.x) % g.y),
                      static_cast<unsigned>(i / (static_cast<int64_t>(g.x) * g.y))};
      run_block(info, body, cbody, i, bid, cfg);
    }
  });
}

DeviceProp* device_properties() {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  std::snprintf(g_prop.name, sizeof g_prop.name, "ltkernels CUDA emulation (%d SMs)", g_config.sms);
  g_prop.multiProcessorCount = g_config.sms;
  g_prop.maxThreadsPerBlock = 1024;
  g_prop.warpSize = 32;
  g_prop.sharedMemPerBlock = kSharedLimit;
  g_prop.major = 9;
  g_prop.minor = 0;
  return &g_prop;
}

Config config() {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  return g_config;
}

void configure(const Config& c) {
  TORCH_CHECK(c.sms >= 1 && c.sms <= 1024, "CUDA emulation: sms must lie in 1..1024, got ", c.sms);
  std::lock_guard<std::mutex> lock(g_config_mutex);
  g_config = c;
}

Stats stats() { return {g_launches.load(), g_blocks.load(), g_threads.load(), g_syncs.load()}; }

}  // namespace ltk_emu
