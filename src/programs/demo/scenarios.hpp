// The demo's scenarios beyond the default one, and what they share with main.cpp.
#pragma once

#include <cstdint>
#include <string>

namespace meshrt_demo {

struct TensorScenarioOptions {
  std::string mesh = "t3000";
  std::string device = "wormhole_b0";
  std::uint32_t iterations = 1;
  double hold_seconds = 0;  // at every step
  std::uint32_t scale_down = 1;  // divides the last two dims of every tensor: 1 runs the seed's shapes
};

// The seed's test_mesh_allocation.py step by step; 0 when every result matched the host and
// nothing is left allocated, 1 otherwise (having said why on stderr).
int run_tensor_scenario(const TensorScenarioOptions& options);

// Waits up to `seconds`, or until SIGUSR1 (main.cpp installs the handler).
void hold(double seconds);

// What the tracker saw when the run ended (the mesh closed): prints "Active allocations: N" (the
// line tools/dev and the tests read) and any unknown frees or duplicate allocations on stderr;
// the exit code, 0 only when all three are 0.
int end_of_run(std::uint64_t active, std::uint64_t unknown_frees, std::uint64_t duplicate_allocations);

}  // namespace meshrt_demo
