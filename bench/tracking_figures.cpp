// What tracking costs the application: the overhead on a device buffer's life, the cost of one
// event, the blocking design it replaced, and how a mesh buffer's cost grows with the mesh.
module;
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

extern "C" void meshrt_bench_toggle_collect();  // callgrind_toggle.cpp

module meshrt.bench;

import meshrt;
import meshrt.protocol;
import meshrt.server;
import meshrt.monitor;
import meshrt.stacks;
import meshrt.testing;

namespace meshrt::bench {

namespace {

using namespace std::chrono_literals;

// The proof-of-concept's strategy, kept as a benchmark mode: every event is one blocking socket
// send, under a mutex, on the application thread.
class BlockingClient final : public EventProcessor {
 public:
  explicit BlockingClient(const std::string& socket) {
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path, socket.c_str(), socket.size() + 1);
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(fd_, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) std::abort();
    std::vector<std::byte> hello;
    protocol::encode(protocol::Hello{.claimed_pid = static_cast<std::uint32_t>(::getpid()), .process_name = "blocking"},
                     hello);
    send_all(hello);
  }
  BlockingClient(const BlockingClient&) = delete;
  BlockingClient& operator=(const BlockingClient&) = delete;
  BlockingClient(BlockingClient&&) = delete;
  BlockingClient& operator=(BlockingClient&&) = delete;
  ~BlockingClient() override { ::close(fd_); }

  void process(std::span<const AllocationEvent> events) noexcept override {
    const std::scoped_lock lock(mutex_);
    for (const AllocationEvent& event : events) {
      frame_.clear();
      const std::array record{event.kind == EventKind::allocate ?
                                  protocol::EventRecord::of(protocol::AllocRecord{.buffer = event.buffer.value(),
                                                                                  .size = event.size}) :
                                  protocol::EventRecord::of(protocol::FreeRecord{.buffer = event.buffer.value()})};
      protocol::encode_events(sequence_++, record, frame_);
      send_all(frame_);
    }
  }

 private:
  void send_all(std::span<const std::byte> bytes) const {
    while (!bytes.empty()) {
      const ssize_t sent = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (sent < 0 && errno == EINTR) continue;
      if (sent <= 0) return;
      bytes = bytes.subspan(static_cast<std::size_t>(sent));
    }
  }

  int fd_{-1};
  std::mutex mutex_;
  std::vector<std::byte> frame_;
  std::uint64_t sequence_{};
};

// Records alternating Alloc/Free events of fresh ids, one event per record() call; time per event.
double ns_per_event(Tracker& tracker, std::uint64_t events, std::uint64_t first_id, int repetitions, Timing timing) {
  AllocationEvent event{.type = BufferType::dram, .size = 2048, .footprint = 2048};
  std::uint64_t id = first_id;
  return median_ns_per_op(
      [&] {
        for (std::uint64_t i = 0; i < events; ++i) {
          event.kind = i % 2 == 0 ? EventKind::allocate : EventKind::free;
          event.buffer = BufferId{id};
          id += i % 2;
          tracker.record(std::span(&event, 1));
        }
      },
      events, repetitions, 2, timing);
}

void device_buffer_lives(MeshDevice& mesh, std::uint64_t lives) {
  const DeviceLocalBufferConfig config{.page_size = 2048, .buffer_type = BufferType::dram};
  for (std::uint64_t i = 0; i < lives; ++i) {
    auto buffer = DeviceBuffer::create(mesh, {0, 0}, 2048, config);
    buffer->deallocate();
  }
}

// Instructions callgrind counted on the main thread of one `--count-lives` run (its file for
// thread 1), or nothing when valgrind could not run it.
std::optional<double> counted_instructions(const Context& context, const std::string& socket, std::uint64_t lives,
                                           const std::string& label) {
  const std::string prefix = context.scratch + "/callgrind." + label;
  testing::ChildProcess run({.argv = {"/usr/bin/valgrind", "--tool=callgrind", "--separate-threads=yes",
                                      "--collect-atstart=no", "--callgrind-out-file=" + prefix + ".%p", context.self,
                                      "--count-lives", socket.empty() ? "-" : socket, std::to_string(lives)},
                             .stdout_path = prefix + ".out",
                             .stderr_path = prefix + ".err"});
  if (run.wait_for(600s) != 0) return std::nullopt;
  std::ifstream file(fmt::format("{}.{}-01", prefix, run.pid()));
  for (std::string line; std::getline(file, line);) {
    if (line.starts_with("totals: ") || line.starts_with("summary: ")) return std::stod(line.substr(line.find(' ') + 1));
  }
  return std::nullopt;
}

// Runs `body` `levels` frames below the caller, each level a frame of its own.
template <class Body>
[[gnu::noinline]] void at_depth(std::size_t levels, Body& body) {
  if (levels > 0) {
    at_depth(levels - 1, body);
    asm volatile("" ::: "memory");  // no tail call: the frame stays
    return;
  }
  body();
}

// How many frames the calling thread's stack has now (capped at the walk's limit).
[[gnu::noinline]] std::size_t frames_here() {
  std::array<std::uintptr_t, stacks::max_frames> frames{};
  return stacks::capture(frames);
}

// Issue 17's figures: what a call stack costs each tracked allocation. The same device buffer
// lives, made 16 frames deep by the application (one call site, so every stack after the first
// is a cache hit), through a client capturing stacks and one not; thread CPU time.
std::vector<Figure> stack_figures(const std::string& socket, MeshDevice& mesh_without) {
  auto client = TrackingClient::start({.socket_path = socket, .capture_stacks = true});
  auto tracker = std::make_shared<Tracker>();
  tracker->add_processor(client);
  auto mesh_with = MeshDevice::create({1, 1}, DeviceSpec::wormhole_b0(), tracker).value();
  constexpr std::size_t call_site_depth = 16;
  const std::size_t depth = frames_here();
  const std::size_t levels = depth < call_site_depth ? call_site_depth - depth : 0;
  constexpr std::uint64_t lives = 50'000;
  const auto deep_lives = [&](MeshDevice& mesh) {
    return [&mesh, levels] {
      auto body = [&mesh] { device_buffer_lives(mesh, lives); };
      at_depth(levels, body);
    };
  };
  const auto [with_ns, without_ns] =
      paired_medians(deep_lives(mesh_with), deep_lives(mesh_without), lives, 15, Timing::thread_cpu);

  // The walk alone, at the same depth.
  std::size_t walked = 0;
  auto walk = [&] {
    std::array<std::uintptr_t, stacks::max_frames> frames{};
    for (int i = 0; i < 100'000; ++i) walked = stacks::capture(frames);
  };
  const double walk_ns = median_ns_per_op([&] { at_depth(levels, walk); }, 100'000, 9, 1, Timing::thread_cpu);
  (void)client->flush(10s);
  const TrackingClient::Status status = client->status();
  return {
      figure("stack_capture_ns", with_ns - without_ns, "ns", Bound::at_most, 250),
      figure("stack_overhead_ratio", with_ns / without_ns, "x", Bound::at_most, 3),
      figure("stack_walk_ns", walk_ns, "ns"),
      figure("stack_walk_frames", static_cast<double>(walked), "frames"),
      figure("stack_interned_stacks", static_cast<double>(status.stacks), "stacks"),
  };
}

}  // namespace

int count_lives(const std::string& socket, std::uint64_t lives) {
  std::shared_ptr<TrackingClient> client;
  auto tracker = std::make_shared<Tracker>();
  if (!socket.empty()) {
    client = TrackingClient::start({.socket_path = socket});
    tracker->add_processor(client);
  }
  auto mesh = MeshDevice::create({1, 1}, DeviceSpec::wormhole_b0(), tracker).value();
  device_buffer_lives(mesh, 1000);  // warm: the lane, the allocator's first blocks, the connection
  if (client) (void)client->flush(10s);
  meshrt_bench_toggle_collect();
  device_buffer_lives(mesh, lives);
  meshrt_bench_toggle_collect();
  if (client && !client->flush(30s)) return 1;
  return 0;
}

std::vector<Figure> tracking_figures(const Context& context) {
  const std::string socket = context.scratch + "/tracking.sock";
  testing::ChildProcess server({.argv = {context.bin_dir + "/meshrt-alloc-server", "--socket", socket, "--quiet",
                                         "--summary-interval", "3600"},
                                .stdout_path = context.scratch + "/tracking-server.log",
                                .stderr_path = context.scratch + "/tracking-server.err"});
  testing::eventually([&] { return server::Monitor::connect(socket).has_value(); }, 10s);

  auto client = TrackingClient::start({.socket_path = socket});
  auto tracked = std::make_shared<Tracker>();
  tracked->add_processor(client);
  auto untracked = std::make_shared<Tracker>();
  const DeviceLocalBufferConfig config{.page_size = 2048, .buffer_type = BufferType::dram};

  // DeviceBuffer allocate + deallocate, tracking on (live server) against off, alternately.
  auto mesh_on = MeshDevice::create({1, 1}, DeviceSpec::wormhole_b0(), tracked).value();
  auto mesh_off = MeshDevice::create({1, 1}, DeviceSpec::wormhole_b0(), untracked).value();
  constexpr std::uint64_t lives = 50'000;
  const auto life = [&](MeshDevice& mesh) {
    return [&] { device_buffer_lives(mesh, lives); };  // the life --count-lives counts, too
  };
  // What the application thread pays (its CPU time) is the target; wall time, which also counts
  // the sender thread and the server taking the other core, is reported beside it.
  const auto [on_ns, off_ns] = paired_medians(life(mesh_on), life(mesh_off), lives, 15, Timing::thread_cpu);
  const auto [on_wall_ns, off_wall_ns] = paired_medians(life(mesh_on), life(mesh_off), lives, 15);

  // One event, recorded in a tight loop while batches flush in the background: the application
  // thread's CPU time (the target), its wall time, and how often the server fell behind.
  const std::uint64_t overflows_before = client->status().overflows;
  const double ours_ns = ns_per_event(*tracked, 1'000'000, std::uint64_t{1} << 62, 9, Timing::thread_cpu);
  const double ours_wall_ns = ns_per_event(*tracked, 1'000'000, std::uint64_t{1} << 60, 9, Timing::wall);
  const std::uint64_t overflows = client->status().overflows - overflows_before;
  auto blocking = std::make_shared<Tracker>();
  blocking->add_processor(std::make_shared<BlockingClient>(socket));
  const double blocking_ns = ns_per_event(*blocking, 20'000, std::uint64_t{1} << 61, 5, Timing::thread_cpu);

  // A replicated mesh buffer's create + destroy on 8x8 against 1x1, tracking on.
  auto mesh_64 = MeshDevice::create({8, 8}, DeviceSpec::wormhole_b0(), tracked).value();
  constexpr std::uint64_t buffers = 20'000;
  const auto create_destroy = [&](MeshDevice& mesh) {
    return [&] {
      for (std::uint64_t i = 0; i < buffers; ++i) {
        auto buffer = MeshBuffer::create(mesh, ReplicatedBufferConfig{.size = 2048}, config);
        buffer->deallocate();
      }
    };
  };
  const auto [ns_64, ns_1] = paired_medians(create_destroy(mesh_64), create_destroy(mesh_on), buffers, 9);

  // Thread churn (issue 11): 10,000 short-lived threads, 8 alive at a time, each allocating and
  // freeing one buffer; tracked (a lane made and reaped per thread) over untracked, wall time.
  constexpr std::uint64_t churned_threads = 10'000;
  const auto churn = [&](MeshDevice& mesh) {
    return [&] {
      for (std::uint64_t started = 0; started < churned_threads; started += 8) {
        std::array<std::thread, 8> batch;
        for (auto& thread : batch) {
          thread = std::thread([&] {
            auto buffer = DeviceBuffer::create(mesh, {0, 0}, 2048, config);
            buffer->deallocate();
          });
        }
        for (auto& thread : batch) thread.join();
      }
    };
  };
  const auto [churn_on_ns, churn_off_ns] = paired_medians(churn(mesh_on), churn(mesh_off), churned_threads, 5);
  client->flush(10s);

  // The same life counted in instructions of the application thread (callgrind, one thread per
  // file): repeatable where wall and CPU time on a shared machine are not.
  constexpr std::uint64_t counted_lives = 20'000;
  const auto tracked_instructions = counted_instructions(context, socket, counted_lives, "tracked");
  const auto untracked_instructions = counted_instructions(context, {}, counted_lives, "untracked");
  const double instructions_ratio = tracked_instructions && untracked_instructions
                                        ? *tracked_instructions / *untracked_instructions
                                        : std::numeric_limits<double>::quiet_NaN();  // missed: valgrind did not run
  if (const char* keep = std::getenv("MESHRT_BENCH_SHOW_LOG"); keep != nullptr) {
    std::fputs(testing::read_text(context.scratch + "/tracking-server.log").c_str(), stderr);
  }

  std::vector<Figure> figures{
      figure("tracked_device_buffer_ns", on_ns, "ns"),
      figure("untracked_device_buffer_ns", off_ns, "ns"),
      figure("tracking_overhead_ratio", on_ns / off_ns, "x", Bound::at_most, 1.10),
      figure("tracking_overhead_ratio_wall", on_wall_ns / off_wall_ns, "x"),
      figure("tracked_device_buffer_instructions", tracked_instructions.value_or(0) / counted_lives, "instr"),
      figure("untracked_device_buffer_instructions", untracked_instructions.value_or(0) / counted_lives, "instr"),
      figure("tracking_overhead_instructions_ratio", instructions_ratio, "x", Bound::at_most, 1.10),
      figure("tracking_ns_per_event", ours_ns, "ns", Bound::at_most, 20),
      figure("tracking_ns_per_event_wall", ours_wall_ns, "ns"),
      figure("tracking_server_overflows", static_cast<double>(overflows), "times"),
      figure("blocking_ns_per_event", blocking_ns, "ns"),
      figure("blocking_baseline_ratio", blocking_ns / ours_ns, "x", Bound::at_least, 20),
      figure("mesh_buffer_ns_1x1", ns_1, "ns"),
      figure("mesh_buffer_ns_8x8", ns_64, "ns"),
      figure("mesh_scaling_ratio", ns_64 / ns_1, "x", Bound::at_most, 8),
      figure("thread_churn_ns_per_thread", churn_on_ns, "ns"),
      figure("thread_churn_ratio", churn_on_ns / churn_off_ns, "x", Bound::at_most, 2.0),
  };
  for (Figure& stack_figure : stack_figures(socket, mesh_on)) figures.push_back(std::move(stack_figure));
  return figures;
}

}  // namespace meshrt::bench
