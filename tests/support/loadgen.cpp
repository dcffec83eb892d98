// meshrt-loadgen — a test client: several threads allocating and freeing random mesh buffers on
// one random mesh, with tracking on when the environment says so. It reports what it believes,
// so tests and the soak can compare the server's ledger with the client's own account.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

import meshrt;

using namespace meshrt;

namespace {

volatile std::sig_atomic_t released = 0;
extern "C" void release(int /*signal*/) { released = 1; }

struct Options {
  std::uint32_t threads = 4;
  std::uint32_t operations = 500;
  std::uint64_t seed = 1;
  std::string mesh;  // random when empty
  std::uint32_t keep = 0;
  double hold_seconds = 0;
  std::string report;
};

// Writes what this process believes is live, per device and type, as JSON.
void write_report(const std::string& path, const LiveBufferTable& live, std::uint64_t allocated, MeshShape shape) {
  nlohmann::json devices = nlohmann::json::array();
  for (std::uint32_t device = 0; device < shape.device_count(); ++device) {
    nlohmann::json entry{{"id", device}};
    for (const BufferType type : all_buffer_types) {
      const LiveBufferSummary s = live.summary(DeviceId{device}, type);
      entry[std::string(to_string(type))] = {{"bytes", s.bytes}, {"buffers", s.buffers}};
    }
    devices.push_back(std::move(entry));
  }
  const nlohmann::json report{{"pid", ::getpid()},
                              {"live_buffers", live.active_allocations()},
                              {"device_buffers_allocated", allocated},
                              {"devices", std::move(devices)}};
  const std::string temporary = path + ".tmp";
  std::ofstream(temporary) << report.dump() << '\n';
  std::rename(temporary.c_str(), path.c_str());  // readers never see half a report
}

int run(int argc, char** argv) {
  Options options;
  CLI::App app{"meshrt-loadgen: random allocation load for tests"};
  app.add_option("--threads", options.threads)->check(CLI::Range(1U, 64U));
  app.add_option("--operations", options.operations, "operations per thread");
  app.add_option("--seed", options.seed);
  app.add_option("--mesh", options.mesh, "RxC or preset; random when absent");
  app.add_option("--keep", options.keep, "buffers per thread left live for the hold");
  app.add_option("--hold", options.hold_seconds, "seconds to hold the kept buffers (SIGUSR1 ends it)");
  app.add_option("--report", options.report, "write the process's own account of live buffers here");
  CLI11_PARSE(app, argc, argv);

  std::signal(SIGUSR1, release);
  std::mt19937_64 random(options.seed);
  MeshShape shape{1 + static_cast<std::uint32_t>(random() % 4), 1 + static_cast<std::uint32_t>(random() % 4)};
  if (!options.mesh.empty()) {
    auto parsed = parse_mesh(options.mesh);
    if (!parsed) {
      fmt::print(stderr, "meshrt-loadgen: {}\n", parsed.error().message);
      return 2;
    }
    shape = *parsed;
  }
  auto tracker = Tracker::process_default();
  auto live = std::make_shared<LiveBufferTable>();
  tracker->add_processor(live);
  auto mesh = MeshDevice::create(shape, DeviceSpec::wormhole_b0(), tracker);
  if (!mesh) {
    fmt::print(stderr, "meshrt-loadgen: {}\n", mesh.error().message);
    return 1;
  }
  std::atomic<std::uint64_t> allocated{0};
  std::atomic<std::uint64_t> failures{0};      // errors other than a full memory: bugs
  std::atomic<std::uint64_t> out_of_memory{0};  // expected under pressure (small carve-outs)
  std::vector<std::vector<MeshBuffer>> kept(options.threads);
  std::vector<std::thread> threads;
  threads.reserve(options.threads);
  for (std::uint32_t t = 0; t < options.threads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(options.seed * 1000 + t);
      std::vector<MeshBuffer> held;
      for (std::uint32_t op = 0; op < options.operations; ++op) {
        if (held.empty() || rng() % 3 != 0) {
          const BufferType type = all_buffer_types[rng() % all_buffer_types.size()];
          const std::uint64_t page = std::uint64_t{64} << (rng() % 6);
          auto buffer = MeshBuffer::create(ReplicatedBufferConfig{.size = page * (1 + rng() % 16)},
                                           {.page_size = page, .buffer_type = type}, *mesh);
          if (!buffer) {
            if (buffer.error().code == ErrorCode::out_of_memory) {
              out_of_memory.fetch_add(1);
            } else if (failures.fetch_add(1) == 0) {
              fmt::print(stderr, "meshrt-loadgen: {}\n", buffer.error().message);
            }
            continue;
          }
          allocated.fetch_add(shape.device_count());
          held.push_back(std::move(*buffer));
        } else {
          const auto at = static_cast<std::ptrdiff_t>(rng() % held.size());
          if (rng() % 2 == 0) held[static_cast<std::size_t>(at)].deallocate();
          held.erase(held.begin() + at);
        }
      }
      while (held.size() > options.keep) held.pop_back();
      kept[t] = std::move(held);
    });
  }
  for (std::thread& thread : threads) thread.join();
  if (!options.report.empty()) write_report(options.report, *live, allocated.load(), shape);
  if (options.hold_seconds > 0) {
    fmt::print("holding {} live buffers (pid {})\n", live->active_allocations(), ::getpid());
    std::fflush(stdout);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(options.hold_seconds);
    while (released == 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  kept.clear();
  if (!options.report.empty()) write_report(options.report, *live, allocated.load(), shape);
  fmt::print("device buffers allocated: {}\nrefused for lack of memory: {}\nfailed allocations: {}\n"
             "Active allocations: {}\n",
             allocated.load(), out_of_memory.load(), failures.load(), live->active_allocations());
  const bool exact = live->active_allocations() == 0 && live->unknown_frees() == 0 && failures.load() == 0;
  return exact ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    fmt::print(stderr, "meshrt-loadgen: {}\n", error.what());
    return 1;
  }
}
