// The emulated library's module: the `ltkernels_emu` op namespace (the CUDA kernels of csrc/cuda, compiled as C++
// and registered there under the CPU key) and the scheduler's configuration.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "emu/runtime.h"

TORCH_LIBRARY(ltkernels_emu, m) {}

namespace {

void configure(const std::string& order, uint64_t seed, int sms) {
  ltk_emu::Config c;
  if (order == "forward")
    c.order = ltk_emu::Order::Forward;
  else if (order == "reverse")
    c.order = ltk_emu::Order::Reverse;
  else if (order == "random")
    c.order = ltk_emu::Order::Random;
  else
    throw pybind11::value_error("order must be 'forward', 'reverse' or 'random', got '" + order + "'");
  c.seed = seed;
  c.sms = sms;
  ltk_emu::configure(c);
}

pybind11::dict config() {
  const ltk_emu::Config c = ltk_emu::config();
  pybind11::dict d;
  d["order"] = c.order == ltk_emu::Order::Forward   ? "forward"
               : c.order == ltk_emu::Order::Reverse ? "reverse"
                                                    : "random";
  d["seed"] = c.seed;
  d["sms"] = c.sms;
  return d;
}

pybind11::dict stats() {
  const ltk_emu::Stats s = ltk_emu::stats();
  pybind11::dict d;
  d["launches"] = s.launches;
  d["blocks"] = s.blocks;
  d["threads"] = s.threads;
  d["syncs"] = s.syncs;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_emu, m) {
  m.doc() = "ltkernels' CUDA kernels under the CPU emulation of CUDA (registered as torch.ops.ltkernels_emu.*)";
  m.def("configure", &configure, pybind11::arg("order") = "forward", pybind11::arg("seed") = 0,
        pybind11::arg("sms") = 2, "Thread order between sync points, its seed, and the emulated SM count.");
  m.def("config", &config, "The scheduler's configuration.");
  m.def("stats", &stats, "Counters since the library was loaded: launches, blocks, threads, sync rounds.");
}
