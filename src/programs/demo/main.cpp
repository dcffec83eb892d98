// meshrt-demo — the seed scenario: 16 mesh buffers on a 2x4 mesh whose footprint on device 0 is
// 100 MiB of DRAM and 12 MiB of L1, written, read back, checked and freed, with the tracker's
// figures printed while live and after. Ends with "Active allocations: N". `--scenario tensors`
// runs the seed's tensor test instead (tensors.cpp).
#include "scenarios.hpp"

#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <thread>

#include <unistd.h>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

import meshrt;

using namespace meshrt;

namespace {

constexpr std::uint64_t page_size = 2048;
constexpr std::uint64_t dram_buffer_size = 13'107'200;  // 12.5 MiB: 8 of them make 100 MiB
constexpr std::uint64_t l1_buffer_size = 1'572'864;     // 1.5 MiB: 8 of them make 12 MiB

// SIGUSR1 ends a --hold early: tests and scripts let the buffers go when they have looked.
volatile std::sig_atomic_t hold_ended = 0;
extern "C" void end_hold(int /*signal*/) { hold_ended = 1; }

}  // namespace

void meshrt_demo::hold(double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (hold_ended == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  hold_ended = 0;
}

int meshrt_demo::end_of_run(std::uint64_t active, std::uint64_t unknown_frees, std::uint64_t duplicate_allocations) {
  if (unknown_frees != 0 || duplicate_allocations != 0) {
    fmt::print(stderr, "meshrt-demo: tracker saw {} unknown frees and {} duplicate allocations\n", unknown_frees,
               duplicate_allocations);
  }
  fmt::print("Active allocations: {}\n", active);
  return active == 0 && unknown_frees == 0 && duplicate_allocations == 0 ? 0 : 1;
}

namespace {

using meshrt_demo::hold;

struct Options {
  std::string scenario = "buffers";
  std::string mesh = "t3000";
  std::string device = "wormhole_b0";
  std::uint32_t buffers = 16;
  std::uint32_t iterations = 1;
  double hold_seconds = 0;
  bool verify = true;
  std::uint32_t scale_down = 1;
};

std::vector<std::byte> pattern(std::uint64_t size, std::uint64_t seed) {
  std::vector<std::byte> bytes(size);
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ULL + 1;
  for (std::byte& b : bytes) {
    state ^= state << 13U;
    state ^= state >> 7U;
    state ^= state << 17U;
    b = static_cast<std::byte>(state & 0xFFU);
  }
  return bytes;
}

// Per device: all memory in use (the mesh's system buffers too, ADR 0020) and the seed's own
// buffers among it.
void print_figures(const MeshDevice& mesh, const LiveBufferTable& live) {
  const std::uint64_t dram_total = mesh.spec().dram.total_bytes();
  const std::uint64_t l1_total = mesh.spec().l1.total_bytes();
  fmt::print("  {:>6}  {:>28}  {:>13}  {:>26}  {:>13}  {:>7}\n", "device", "DRAM used / total (bytes)",
             "in buffers", "L1 used / total (bytes)", "in buffers", "buffers");
  for (std::uint32_t index = 0; index < mesh.device_count(); ++index) {
    const DeviceId device{index};
    const LiveBufferSummary dram = live.summary(device, BufferType::dram);
    const LiveBufferSummary l1 = live.summary(device, BufferType::l1);
    const LiveBufferSummary dram_buffers = live.summary(device, BufferType::dram, AllocationCategory::buffer);
    const LiveBufferSummary l1_buffers = live.summary(device, BufferType::l1, AllocationCategory::buffer);
    fmt::print("  {:>6}  {:>28}  {:>13}  {:>26}  {:>13}  {:>7}\n", index, fmt::format("{} / {}", dram.bytes, dram_total),
               dram_buffers.bytes, fmt::format("{} / {}", l1.bytes, l1_total), l1_buffers.bytes,
               dram_buffers.buffers + l1_buffers.buffers);
  }
}

// Allocates, writes, verifies; returns false (after saying why) on any failure.
bool run_iteration(MeshDevice& mesh, const LiveBufferTable& live, const Options& options, std::uint32_t iteration) {
  std::vector<MeshBuffer> buffers;
  buffers.reserve(options.buffers);
  const std::uint32_t dram_buffers = (options.buffers + 1) / 2;
  for (std::uint32_t i = 0; i < options.buffers; ++i) {
    const bool dram = i < dram_buffers;
    auto buffer = MeshBuffer::create(mesh,
                                     ReplicatedBufferConfig{.size = dram ? dram_buffer_size : l1_buffer_size,
                               .name = fmt::format("seed-{}-{}", dram ? "dram" : "l1", i)},
                                     DeviceLocalBufferConfig{.page_size = page_size, .buffer_type = dram ? BufferType::dram : BufferType::l1});
    if (!buffer) {
      fmt::print(stderr, "meshrt-demo: buffer {} of {}: {}\n", i + 1, options.buffers, buffer.error().message);
      return false;
    }
    buffers.push_back(std::move(*buffer));
  }
  fmt::print("  allocated {} mesh buffers = {} device buffers\n", buffers.size(),
             std::uint64_t{buffers.size()} * mesh.device_count());

  if (options.verify) {
    std::uint64_t checked = 0;
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      MeshBuffer& buffer = buffers[i];
      const auto data = pattern(buffer.size(), i + 1 + std::uint64_t{iteration} * 1000);
      if (auto written = buffer.write(data); !written) {
        fmt::print(stderr, "meshrt-demo: write of buffer {}: {}\n", i, written.error().message);
        return false;
      }
      std::vector<std::byte> back(buffer.size());
      for (DeviceBuffer& device_buffer : buffer.device_buffers()) {
        if (auto read = device_buffer.read(back); !read || back != data) {
          fmt::print(stderr, "meshrt-demo: buffer {} on device {} does not read back what was written{}\n", i,
                     device_buffer.device().value(), read ? "" : ": " + read.error().message);
          return false;
        }
        ++checked;
      }
    }
    fmt::print("  wrote a pattern to every buffer and read it back from every device: {} device buffers match\n",
               checked);
  }

  print_figures(mesh, live);
  if (options.hold_seconds > 0) {
    fmt::print("  holding {} buffers live for {} s (pid {}; SIGUSR1 ends the hold)\n", buffers.size(),
               options.hold_seconds, static_cast<long>(::getpid()));
    std::fflush(stdout);
    hold(options.hold_seconds);
  }
  for (MeshBuffer& buffer : buffers) buffer.deallocate();
  fmt::print("  freed {} mesh buffers\n", buffers.size());
  return true;
}

int run(int argc, char** argv) {
  Options options;
  CLI::App app{"meshrt-demo: the seed scenario (16 buffers on a 2x4 mesh: 100 MiB DRAM and 12 MiB L1 on device 0),\n"
               "or with --scenario tensors the seed's tensor test (distribute, add, matmul, deallocate, clear the\n"
               "program cache, close)"};
  app.add_option("--scenario", options.scenario,
                 "buffers: the seed's 16 mesh buffers; tensors: the seed's test_mesh_allocation.py")
      ->capture_default_str()
      ->check(CLI::IsMember({"buffers", "tensors"}));
  app.add_option("--mesh", options.mesh, "mesh shape RxC (up to 8x8) or preset: n150, n300, t3000, galaxy, tgg")
      ->capture_default_str();
  app.add_option("--device", options.device, "device kind: wormhole_b0 or blackhole")->capture_default_str();
  app.add_option("--buffers", options.buffers, "mesh buffers per iteration, half DRAM (12.5 MiB) and half L1 (1.5 MiB)")
      ->capture_default_str()
      ->check(CLI::Range(1U, 100000U));
  app.add_option("--iterations", options.iterations, "repeat the scenario; nothing may accumulate")
      ->capture_default_str()
      ->check(CLI::Range(1U, 1000000U));
  app.add_option("--hold", options.hold_seconds,
                 "seconds to hold the buffers live (tensors: after every step), for a monitor or a kill (SIGUSR1 "
                 "ends it early)")
      ->check(CLI::Range(0.0, 86400.0));
  app.add_flag("!--no-verify", options.verify, "skip writing and reading back the pattern");
  app.add_option("--scale-down", options.scale_down,
                 "tensors: divide the last two dims of every tensor by this (1, 2, 4 or 8; 1 is the seed's shapes)")
      ->capture_default_str()
      ->check(CLI::IsMember({1U, 2U, 4U, 8U}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::ParseError& error) {
    fmt::print(stderr, "meshrt-demo: {}\n\n{}", error.what(), app.help());
    return 2;
  }

  std::signal(SIGUSR1, end_hold);
  if (options.scenario == "tensors") {
    return meshrt_demo::run_tensor_scenario({.mesh = options.mesh,
                                             .device = options.device,
                                             .iterations = options.iterations,
                                             .hold_seconds = options.hold_seconds,
                                             .scale_down = options.scale_down});
  }
  const auto shape = parse_mesh(options.mesh);
  const auto spec = DeviceSpec::named(options.device);
  if (!shape || !spec) {
    fmt::print(stderr, "meshrt-demo: {}\n\n{}", (!shape ? shape.error() : spec.error()).message, app.help());
    return 2;
  }

  auto tracker = Tracker::process_default();
  auto live = std::make_shared<LiveBufferTable>();
  tracker->add_processor(live);
  auto mesh = MeshDevice::create(*shape, *spec, tracker);
  if (!mesh) {
    fmt::print(stderr, "meshrt-demo: {}\n", mesh.error().message);
    return 1;
  }
  fmt::print("meshrt-demo: seed scenario on a {} mesh ({}) of {}: {} mesh buffers, {} iteration{}\n", options.mesh,
             to_string(*shape), spec->name, options.buffers, options.iterations, options.iterations == 1 ? "" : "s");

  for (std::uint32_t iteration = 1; iteration <= options.iterations; ++iteration) {
    fmt::print("iteration {}/{}\n", iteration, options.iterations);
    if (!run_iteration(*mesh, *live, options, iteration)) return 1;
    // The mesh's system buffers stay until it closes; the iteration's own must all be gone.
    if (const auto left = live->active_allocations(AllocationCategory::buffer); left != 0) {
      fmt::print(stderr, "meshrt-demo: {} allocations still live after iteration {}\n", left, iteration);
      return 1;
    }
  }
  print_figures(*mesh, *live);
  mesh->close();
  return meshrt_demo::end_of_run(live->active_allocations(), live->unknown_frees(), live->duplicate_allocations());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {  // only allocation failure or I/O can get here
    fmt::print(stderr, "meshrt-demo: {}\n", error.what());
    return 1;
  }
}
