// meshrt-loadgen — a test client: several threads allocating and freeing random mesh buffers on
// one random mesh, with tracking on when the environment says so. It reports what it believes,
// so tests and the soak can compare the server's ledger with the client's own account.
//
// Life of a run: work (--operations per thread, or for --duration seconds), then free all but
// --keep buffers per thread, flush the tracking client, write the report with "phase": "hold",
// and hold until SIGUSR1 or --hold seconds pass; then free everything and write "phase": "done".
// While working, the report is rewritten every --report-interval seconds ("phase": "working").
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

import meshrt;
import meshrt.testing;

namespace {
// A test client counts every device buffer it makes: its meshes open without system buffers
// (ADR 0020), which the demo's tests cover.
meshrt::DeviceSpec client_spec() { return meshrt::testing::without_system_buffers(meshrt::DeviceSpec::wormhole_b0(meshrt::testing::every_region)); }
}  // namespace

using namespace meshrt;
using namespace std::chrono_literals;

namespace {

volatile std::sig_atomic_t resumed = 0;
extern "C" void resume(int /*signal*/) { resumed = 1; }

struct Options {
  std::uint32_t threads = 4;
  std::uint32_t operations = 500;
  double duration_seconds = 0;
  std::uint64_t seed = 1;
  std::string mesh;  // random when empty
  std::uint32_t keep = 0;
  double hold_seconds = 0;
  std::string report;
  double report_interval = 0.5;
  std::uint64_t max_pending_bytes = 0;  // the tracking client's default when 0
  std::uint32_t thread_churn = 0;       // operations per short-lived thread (0: one thread per worker)
  double fork_every_seconds = 0;        // fork a child that allocates and exits this often (0: never)
};

struct Counters {
  std::atomic<std::uint64_t> allocated{0};      // device buffers allocated
  std::atomic<std::uint64_t> freed{0};          // device buffers freed
  std::atomic<std::uint64_t> failures{0};       // errors other than a full memory: bugs
  std::atomic<std::uint64_t> out_of_memory{0};  // expected under pressure (small carve-outs)
};

// What the process believes, per device and type, plus what its tracking client says of itself.
void write_report(const Options& options, const char* phase, const LiveBufferTable& live, const Counters& counters,
                  MeshShape shape, const TrackingClient* client, bool flushed) {
  nlohmann::json devices = nlohmann::json::array();
  std::uint64_t live_bytes = 0;
  for (std::uint32_t device = 0; device < shape.device_count(); ++device) {
    nlohmann::json entry{{"id", device}};
    for (const BufferType type : all_buffer_types) {
      const LiveBufferSummary s = live.summary(DeviceId{device}, type);
      entry[std::string(to_string(type))] = {{"bytes", s.bytes}, {"buffers", s.buffers}};
      live_bytes += s.bytes;
    }
    devices.push_back(std::move(entry));
  }
  nlohmann::json report{{"pid", ::getpid()},
                        {"phase", phase},
                        {"live_buffers", live.active_allocations()},
                        {"live_bytes", live_bytes},
                        {"device_buffers_allocated", counters.allocated.load()},
                        {"device_buffers_freed", counters.freed.load()},
                        {"failures", counters.failures.load()},
                        {"flushed", flushed},
                        {"devices", std::move(devices)}};
  if (client != nullptr) {
    const TrackingClient::Status s = client->status();
    report["tracking"] = {{"connected", s.connected},     {"events_queued", s.events_queued},
                          {"connections", s.connections}, {"snapshots", s.snapshots},
                          {"overflows", s.overflows}};
  }
  const std::string temporary = options.report + ".tmp";
  std::ofstream(temporary) << report.dump() << '\n';
  std::rename(temporary.c_str(), options.report.c_str());  // readers never see half a report
}

void work(const Options& options, std::uint32_t thread, MeshDevice& mesh, MeshShape shape, Counters& counters,
          std::vector<MeshBuffer>& kept) {
  std::mt19937_64 rng(options.seed * 1000 + thread);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(options.duration_seconds);
  const auto more = [&](std::uint32_t done) {
    return options.duration_seconds > 0 ? std::chrono::steady_clock::now() < deadline : done < options.operations;
  };
  std::vector<MeshBuffer> held;
  const auto one_operation = [&] {
    if (held.empty() || rng() % 3 != 0) {
      const BufferType type = all_buffer_types[rng() % all_buffer_types.size()];
      const std::uint64_t page = std::uint64_t{64} << (rng() % 6);
      auto buffer = MeshBuffer::create(mesh,
                                       ReplicatedBufferConfig{.size = page * (1 + rng() % 16)},
                                       {.page_size = page, .buffer_type = type});
      if (!buffer) {
        if (buffer.error().code == ErrorCode::out_of_memory) {
          counters.out_of_memory.fetch_add(1);
        } else if (counters.failures.fetch_add(1) == 0) {
          fmt::print(stderr, "meshrt-loadgen: {}\n", buffer.error().message);
        }
        return;
      }
      counters.allocated.fetch_add(shape.device_count());
      held.push_back(std::move(*buffer));
    } else {
      const auto at = static_cast<std::ptrdiff_t>(rng() % held.size());
      if (rng() % 2 == 0) held[static_cast<std::size_t>(at)].deallocate();
      held.erase(held.begin() + at);
      counters.freed.fetch_add(shape.device_count());
    }
  };
  // With thread churn the worker's operations run in short-lived threads, one after another: a
  // thread pool that replaces its threads, or a thread per request.
  for (std::uint32_t op = 0; more(op);) {
    const auto run_some = [&] {
      for (std::uint32_t n = 0; more(op) && (options.thread_churn == 0 || n < options.thread_churn); ++n, ++op) {
        one_operation();
      }
    };
    if (options.thread_churn == 0) {
      run_some();
    } else {
      std::thread(run_some).join();
    }
  }
  while (held.size() > options.keep) {
    held.pop_back();
    counters.freed.fetch_add(shape.device_count());
  }
  kept = std::move(held);
}

int run(int argc, char** argv) {
  Options options;
  CLI::App app{"meshrt-loadgen: random allocation load for tests"};
  app.add_option("--threads", options.threads)->check(CLI::Range(1U, 64U));
  app.add_option("--operations", options.operations, "operations per thread");
  app.add_option("--duration", options.duration_seconds, "work for this many seconds instead of --operations")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--seed", options.seed);
  app.add_option("--mesh", options.mesh, "RxC or preset; random when absent");
  app.add_option("--keep", options.keep, "buffers per thread left live for the hold");
  app.add_option("--hold", options.hold_seconds, "seconds to hold the kept buffers (SIGUSR1 ends it)");
  app.add_option("--report", options.report, "write the process's own account of live buffers here");
  app.add_option("--report-interval", options.report_interval, "seconds between reports while working")
      ->check(CLI::PositiveNumber);
  app.add_option("--max-pending-bytes", options.max_pending_bytes,
                 "the tracking client's bound on queued bytes for a slow server");
  app.add_option("--thread-churn", options.thread_churn, "operations per short-lived thread (0: none)");
  app.add_option("--fork-every", options.fork_every_seconds,
                 "while working, fork a child that allocates on a mesh of its own and exits, this often")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);

  std::signal(SIGUSR1, resume);
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
  // Our own tracker and client (not the process default) so the report can flush and show status.
  auto tracker = std::make_shared<Tracker>();
  std::shared_ptr<TrackingClient> client;
  if (tracking_enabled_by_environment()) {
    TrackingClient::Options client_options{.process_name = "meshrt-loadgen"};
    if (options.max_pending_bytes > 0) client_options.max_pending_bytes = options.max_pending_bytes;
    client = TrackingClient::start(std::move(client_options));
    tracker->add_processor(client);
  }
  auto live = std::make_shared<LiveBufferTable>();
  tracker->add_processor(live);
  auto mesh = MeshDevice::create(shape, client_spec(), tracker);
  if (!mesh) {
    fmt::print(stderr, "meshrt-loadgen: {}\n", mesh.error().message);
    return 1;
  }
  Counters counters;
  std::vector<std::vector<MeshBuffer>> kept(options.threads);
  std::atomic<std::uint32_t> working{options.threads};
  std::vector<std::thread> threads;
  threads.reserve(options.threads);
  for (std::uint32_t t = 0; t < options.threads; ++t) {
    threads.emplace_back([&, t] {
      work(options, t, *mesh, shape, counters, kept[t]);
      working.fetch_sub(1);
    });
  }
  const auto report = [&](const char* phase) {
    if (options.report.empty()) return;
    const bool flushed = client == nullptr || client->flush(30s);
    write_report(options, phase, *live, counters, shape, client.get(), flushed);
  };
  std::uint64_t forks = 0;
  auto next_fork = std::chrono::steady_clock::now();
  const auto maybe_fork = [&] {
    if (options.fork_every_seconds <= 0 || std::chrono::steady_clock::now() < next_fork) return;
    next_fork += std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double>(options.fork_every_seconds));
    // The child inherits this process's tracking client, which is inert there (ADR 0017): what it
    // allocates must not reach the parent's session. It leaves with _exit: the parent's other
    // threads may hold locks the child would need to run the parent's exit handlers.
    const pid_t child = ::fork();
    if (child == 0) {
      // A tracker of its own with the inherited client on it (the parent's LiveBufferTable may
      // have been locked by another thread at the fork).
      auto own_tracker = std::make_shared<Tracker>();
      if (client) own_tracker->add_processor(client);
      auto own = MeshDevice::create({1, 1}, client_spec(), own_tracker);
      if (own) {
        for (int i = 0; i < 16; ++i) {
          (void)MeshBuffer::create(*own, ReplicatedBufferConfig{.size = 4096}, {.page_size = 1024});
        }
      }
      ::_exit(0);
    }
    if (child > 0) {
      int status = 0;
      ::waitpid(child, &status, 0);
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) counters.failures.fetch_add(1);
      ++forks;
    }
  };
  if (!options.report.empty() || options.fork_every_seconds > 0) {
    auto next = std::chrono::steady_clock::now();
    while (working.load() > 0) {
      maybe_fork();
      if (options.report.empty()) {
        std::this_thread::sleep_for(5ms);
        continue;
      }
      if (std::chrono::steady_clock::now() >= next) {
        write_report(options, "working", *live, counters, shape, client.get(), false);
        next += std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(options.report_interval));
      }
      std::this_thread::sleep_for(5ms);
    }
  }
  for (std::thread& thread : threads) thread.join();
  report("hold");
  if (options.hold_seconds > 0) {
    fmt::print("holding {} live buffers (pid {})\n", live->active_allocations(), ::getpid());
    std::fflush(stdout);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(options.hold_seconds);
    while (resumed == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
  }
  for (const auto& buffers : kept) counters.freed.fetch_add(buffers.size() * shape.device_count());
  kept.clear();
  report("done");
  fmt::print("device buffers allocated: {}\nrefused for lack of memory: {}\nfailed allocations: {}\n"
             "children forked: {}\nActive allocations: {}\n",
             counters.allocated.load(), counters.out_of_memory.load(), counters.failures.load(), forks,
             live->active_allocations());
  const bool exact = live->active_allocations() == 0 && live->unknown_frees() == 0 && counters.failures.load() == 0;
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
