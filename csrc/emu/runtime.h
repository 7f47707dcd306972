// Configuration and counters of the CUDA emulation's scheduler (runtime.cpp), set from Python (module.cpp).
#pragma once

#include <cstdint>

namespace ltk_emu {

// The order in which a block's threads run between two sync points (and the blocks of a grid are taken).
enum class Order { Forward, Reverse, Random };

struct Config {
  Order order = Order::Forward;
  uint64_t seed = 0;  // of the random order
  int sms = 2;        // the emulated device's multiProcessorCount (kernels size their grids by it)
};

struct Stats {
  int64_t launches, blocks, threads, syncs;
};

Config config();
void configure(const Config& c);
Stats stats();

}  // namespace ltk_emu
