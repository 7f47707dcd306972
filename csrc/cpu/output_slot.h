// A large CPU output that is transient by nature, taken from memory that is already faulted in. A loss's gradient
// with respect to its logits is such an output: autograd hands it to the layer below and drops it before the next
// step asks for another of the same size. Fresh memory of that size costs its page faults again on every step (the
// 96 MB EFL gradient at 20000 x 1203: ~10 ms in 2 MiB pages on 2 threads, ~40 ms in 4 KiB pages, against ~7 ms to
// write it), because glibc returns allocations above 32 MiB to the system when they are freed. A slot keeps the
// storage of the output it last handed out and hands it out again once the slot holds its only reference (no tensor,
// view or weak reference left anywhere), so a buffer is never shared; otherwise it allocates afresh (huge pages
// advised) and keeps that one instead. What it keeps between calls is one output of the size in use, freed when a
// call needs another size or dtype, or by `release_output_slots` (`ltkernels.release_cpu_buffers()`, for a process
// that trained and goes on to other work).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
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
  OutputSlot() {
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
    if (kept_ && kept_dtype_ == dtype && kept_->nbytes() == need && kept_.use_count() == 1 &&
        kept_.weak_use_count() == 1) {
      std::atomic_thread_fence(std::memory_order_acquire);  // after the last user's release of its reference
      return at::empty({0}, options).set_(c10::Storage(kept_), 0, sizes);
    }
    kept_.reset();  // before the new allocation: never two of them held at once
    at::Tensor fresh = at::empty(sizes, options);
    advise_huge_pages(fresh);
    kept_ = c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(fresh.storage().unsafeGetStorageImpl());
    kept_dtype_ = dtype;
    return fresh;
  }

  // Drops the kept storage (freed now unless a tensor still uses it); returns its bytes.
  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t bytes = kept_ && kept_.use_count() == 1 ? kept_->nbytes() : 0;  // else it frees with its tensor
    kept_.reset();
    return bytes;
  }

 private:
  static constexpr size_t kMinBytes = size_t{32} << 20;
  std::mutex mu_;
  c10::intrusive_ptr<c10::StorageImpl> kept_;
  at::ScalarType kept_dtype_ = at::kFloat;
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
