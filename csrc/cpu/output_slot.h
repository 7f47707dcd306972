// A large CPU output taken from memory that is already faulted in. Fresh memory of a large size costs its page
// faults again on every call (the 96 MB EFL gradient at 20000 x 1203: ~10 ms in 2 MiB pages on 2 threads, ~40 ms in
// 4 KiB pages, against ~7 ms to write it), because glibc returns allocations above 32 MiB to the system when they
// are freed. A slot keeps the storages of the outputs it last handed out (`depth` of them) and hands one out again
// once the slot holds its only reference (no tensor, view or weak reference left anywhere), so a buffer is never
// shared; otherwise it allocates afresh (huge pages advised) and keeps that one in place of the oldest.
// Depth 1 serves a loss's gradient with respect to its logits: autograd hands it to the layer below and drops it
// before the next step asks for another. Depth 2 serves an output the caller keeps until the next call has returned
// (`scores = f(x)` in a loop: the previous result is still referenced while the next one is made). What a slot keeps
// between calls is at most `depth` outputs of the sizes in use, freed when calls need other sizes or dtypes, or by
// `release_output_slots` (`ltkernels.release_cpu_buffers()`, for a process that goes on to other work).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "cpu/huge_pages.h"

namespace ltk::cpu {

class OutputSlot;

// Every slot of the library (a slot is a function-local static: it lives until the process ends).
struct SlotRegistry {
  std::mutex mu;
  std::vector<OutputSlot*> slots;
};
inline SlotRegistry& slot_registry() {
  static SlotRegistry* r = new SlotRegistry;  // never destroyed: slots may outlive any static destructor order
  return *r;
}

class OutputSlot {
 public:
  explicit OutputSlot(int depth = 1) : kept_(depth) {
    SlotRegistry& r = slot_registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.slots.push_back(this);
  }
  OutputSlot(const OutputSlot&) = delete;
  OutputSlot& operator=(const OutputSlot&) = delete;

  // An uninitialised contiguous CPU tensor of `sizes` and `dtype`: the caller writes every element.
  at::Tensor take(at::IntArrayRef sizes, at::ScalarType dtype) {
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
    const size_t need = static_cast<size_t>(c10::multiply_integers(sizes)) * at::elementSize(dtype);
    if (need < kMinBytes) return at::empty(sizes, options);  // below glibc's mmap threshold: malloc reuses it anyway
    std::lock_guard<std::mutex> lock(mu_);
    for (Kept& k : kept_) {
      if (k.storage && k.dtype == dtype && k.storage->nbytes() == need && unused(k)) {
        std::atomic_thread_fence(std::memory_order_acquire);  // after the last user's release of its reference
        k.order = ++handed_out_;
        return at::empty({0}, options).set_(c10::Storage(k.storage), 0, sizes);
      }
    }
    // Keep the fresh output in place of an entry nobody else holds (empty, or reachable by weak references only:
    // freed now), else in place of the oldest, whose tensor keeps its memory without the slot.
    Kept* slot = &kept_[0];
    for (Kept& k : kept_) {
      if (!k.storage || k.storage.use_count() == 1) {
        slot = &k;
        break;
      }
      if (k.order < slot->order) slot = &k;
    }
    slot->storage.reset();
    at::Tensor fresh = at::empty(sizes, options);
    slot->storage = c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(fresh.storage().unsafeGetStorageImpl());
    slot->dtype = dtype;
    slot->order = ++handed_out_;
    return advise_huge_pages(fresh);
  }

  // Drops the kept storages (freed now unless a tensor still uses them); returns the bytes freed now.
  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    size_t bytes = 0;
    for (Kept& k : kept_) {
      if (k.storage && unused(k)) bytes += k.storage->nbytes();  // else it frees with its tensor
      k.storage.reset();
    }
    return bytes;
  }

 private:
  struct Kept {
    c10::intrusive_ptr<c10::StorageImpl> storage;
    at::ScalarType dtype = at::kFloat;
    uint64_t order = 0;  // when it was last handed out
  };
  static bool unused(const Kept& k) { return k.storage.use_count() == 1 && k.storage.weak_use_count() == 1; }

  static constexpr size_t kMinBytes = size_t{32} << 20;
  std::mutex mu_;
  std::vector<Kept> kept_;
  uint64_t handed_out_ = 0;
};

// Releases what every slot keeps; returns the bytes they held.
inline size_t release_output_slots() {
  SlotRegistry& r = slot_registry();
  std::lock_guard<std::mutex> lock(r.mu);
  size_t bytes = 0;
  for (OutputSlot* s : r.slots) bytes += s->release();
  return bytes;
}

}  // namespace ltk::cpu
