// What the server keeps up with: events per second from 8 processes, nothing lost, memory per
// live allocation and the monitor's round trip at a million live allocations.
module;
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>
#include <sys/un.h>
#include <malloc.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

module meshrt.bench;

import meshrt.core;
import meshrt.protocol;
import meshrt.server;
import meshrt.monitor;
import meshrt.testing;

namespace meshrt::bench {

namespace {

using namespace std::chrono_literals;

constexpr std::size_t clients = 8;
constexpr std::uint64_t events_per_client = 4'096'000;  // whole rounds of 2 x batch
constexpr std::uint64_t live_allocations = 1'000'000;
constexpr std::size_t batch = 2048;

int connect_to(const std::string& socket) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::memcpy(address.sun_path, socket.c_str(), socket.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || ::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) return -1;
  return fd;
}

bool send_all(int fd, std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    const ssize_t sent = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    if (sent <= 0) return false;
    bytes = bytes.subspan(static_cast<std::size_t>(sent));
  }
  return true;
}

void hello(int fd) {
  std::vector<std::byte> bytes;
  protocol::encode(protocol::Hello{.claimed_pid = static_cast<std::uint32_t>(::getpid()), .process_name = "bench"},
                   bytes);
  send_all(fd, bytes);
}

// Writes a little-endian u64 into an encoded frame (the sequence number of a batch).
void patch_sequence(std::vector<std::byte>& frame, std::uint64_t sequence) {
  for (std::size_t i = 0; i < 8; ++i) frame[protocol::header_size + i] = static_cast<std::byte>((sequence >> (8 * i)) & 0xFFU);
}

nlohmann::json summary(server::Monitor& monitor) {
  return nlohmann::json::parse(monitor.query(protocol::QueryKind::summary).value());
}


testing::ChildProcess start_server(const Context& context, const std::string& socket, const std::string& name) {
  return testing::ChildProcess({.argv = {context.bin_dir + "/meshrt-alloc-server", "--socket", socket, "--quiet",
                                         "--summary-interval", "3600"},
                                .stdout_path = context.scratch + "/" + name + ".log",
                                .stderr_path = context.scratch + "/" + name + ".err"});
}

}  // namespace

// Frames of `batch` allocations and `batch` frees, encoded once; only the sequence numbers change.
int blast(const std::string& socket, std::uint64_t events) {
  const int fd = connect_to(socket);
  if (fd < 0) return 1;
  hello(fd);
  std::vector<protocol::EventRecord> allocs(batch);
  std::vector<protocol::EventRecord> frees(batch);
  for (std::size_t i = 0; i < batch; ++i) {
    allocs[i] = protocol::EventRecord::of(protocol::AllocRecord{
        .buffer = i + 1, .mesh_buffer = 1, .address = i * 64, .size = 64, .device = static_cast<std::uint32_t>(i % 8)});
    frees[i] = protocol::EventRecord::of(protocol::FreeRecord{.buffer = i + 1, .reason = 1});
  }
  std::vector<std::byte> alloc_frame;
  std::vector<std::byte> free_frame;
  protocol::encode_events(0, allocs, alloc_frame);
  protocol::encode_events(0, frees, free_frame);
  std::vector<std::byte> both;
  std::uint64_t sequence = 0;
  for (std::uint64_t sent = 0; sent < events; sent += 2 * batch) {
    patch_sequence(alloc_frame, sequence);
    patch_sequence(free_frame, sequence + batch);
    sequence += 2 * batch;
    both.assign(alloc_frame.begin(), alloc_frame.end());
    both.insert(both.end(), free_frame.begin(), free_frame.end());
    if (!send_all(fd, both)) return 1;
  }
  std::vector<std::byte> goodbye;
  protocol::encode(protocol::Goodbye{}, goodbye);
  send_all(fd, goodbye);
  ::close(fd);
  return 0;
}

// A million live allocations over 64 devices and every buffer type, held until SIGTERM.
int hold(const std::string& socket, std::uint64_t live) {
  const int fd = connect_to(socket);
  if (fd < 0) return 1;
  hello(fd);
  std::vector<protocol::EventRecord> records;
  std::vector<std::byte> frames;
  std::uint64_t sequence = 0;
  for (std::uint64_t id = 1; id <= live; ++id) {
    records.push_back(protocol::EventRecord::of(protocol::AllocRecord{.buffer = id,
                                                                      .mesh_buffer = 1 + id / 64,
                                                                      .address = (id / 64) * 4096,
                                                                      .size = 4096,
                                                                      .time_ns = 1,
                                                                      .device = static_cast<std::uint32_t>(id % 64),
                                                                      .type = all_buffer_types[(id / 64) % buffer_type_count]}));
    if (records.size() == protocol::max_records || id == live) {
      protocol::encode_events(sequence, records, frames);
      sequence += records.size();
      records.clear();
    }
  }
  if (!send_all(fd, frames)) return 1;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigprocmask(SIG_BLOCK, &set, nullptr);
  int signal_number = 0;
  sigwait(&set, &signal_number);
  ::close(fd);
  return 0;
}

std::vector<Figure> server_figures(const Context& context) {
  std::vector<Figure> figures;
  {
    const std::string socket = context.scratch + "/ingest.sock";
    auto server = start_server(context, socket, "ingest-server");
    testing::eventually([&] { return server::Monitor::connect(socket).has_value(); }, 10s);
    auto monitor = server::Monitor::connect(socket).value();
    const std::uint64_t expected = clients * events_per_client;
    std::vector<std::unique_ptr<testing::ChildProcess>> blasters;
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < clients; ++i) {
      blasters.push_back(std::make_unique<testing::ChildProcess>(testing::ChildProcess::Options{
          .argv = {context.self, "--blast", socket, std::to_string(events_per_client)},
          .stdout_path = context.scratch + "/blast-" + std::to_string(i) + ".out",
          .stderr_path = context.scratch + "/blast-" + std::to_string(i) + ".err"}));
    }
    std::uint64_t applied = 0;
    testing::eventually(
        [&] {
          const auto now = summary(monitor);
          applied = now["total_allocations"].get<std::uint64_t>() + now["total_deallocations"].get<std::uint64_t>();
          return applied >= expected;
        },
        300s);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (auto& blaster : blasters) (void)blaster->wait_for(60s);
    const auto final_summary = summary(monitor);
    applied = final_summary["total_allocations"].get<std::uint64_t>() +
              final_summary["total_deallocations"].get<std::uint64_t>();
    figures.push_back(figure("server_ingest_events_per_s", static_cast<double>(expected) / seconds, "events/s",
                             Bound::at_least, 5'000'000));
    figures.push_back(figure("events_lost", static_cast<double>(expected) - static_cast<double>(applied), "events",
                             Bound::at_most, 0));
  }
  {
    const std::string socket = context.scratch + "/memory.sock";
    auto server = start_server(context, socket, "memory-server");
    testing::eventually([&] { return server::Monitor::connect(socket).has_value(); }, 10s);
    auto monitor = server::Monitor::connect(socket).value();
    (void)summary(monitor);
    const std::uint64_t before = testing::resident_kib(server.pid());
    testing::ChildProcess holder({.argv = {context.self, "--hold", socket, std::to_string(live_allocations)},
                                  .stdout_path = context.scratch + "/hold.out",
                                  .stderr_path = context.scratch + "/hold.err"});
    testing::eventually([&] { return summary(monitor)["active_allocations"] == live_allocations; }, 120s);
    const std::uint64_t after = testing::resident_kib(server.pid());
    figures.push_back(figure("server_bytes_per_live_allocation",
                             static_cast<double>(after - before) * 1024.0 / static_cast<double>(live_allocations), "B",
                             Bound::at_most, 96));
    // The monitor's question at a million live allocations, as meshrt-smi --json asks it:
    // connect, say Hello, ask, read the reply, parse the JSON.
    const double query_ns = median_ns_per_op(
        [&] {
          auto fresh = server::Monitor::connect(socket).value();
          (void)nlohmann::json::parse(fresh.query(protocol::QueryKind::summary).value());
        },
        1, 31);
    figures.push_back(figure("query_ms_1m", query_ns / 1e6, "ms", Bound::at_most, 5));
    const double smi_ns = median_ns_per_op(
        [&] {
          testing::ChildProcess smi({.argv = {context.bin_dir + "/meshrt-smi", "--socket", socket, "--json"},
                                     .stdout_path = context.scratch + "/smi.out",
                                     .stderr_path = context.scratch + "/smi.err"});
          (void)smi.wait_for(30s);
        },
        1, 11);
    figures.push_back(figure("smi_process_ms_1m", smi_ns / 1e6, "ms"));

    // The buffer list at a million live buffers (issue 11, item 8): from the question to the
    // last byte of the reply; and meanwhile other monitors' summaries, answered between pages.
    std::atomic<bool> listing{true};
    double list_ms = 0;
    std::size_t list_bytes = 0;
    std::thread lister([&] {
      auto own = server::Monitor::connect(socket).value();
      const auto started = std::chrono::steady_clock::now();
      list_bytes = own.query(protocol::QueryKind::buffers).value().size();
      list_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
      listing.store(false);
    });
    double slowest_summary_ms = 0;
    std::uint64_t summaries = 0;
    while (listing.load()) {
      const auto started = std::chrono::steady_clock::now();
      (void)summary(monitor);
      slowest_summary_ms = std::max(
          slowest_summary_ms, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count());
      ++summaries;
    }
    lister.join();
    figures.push_back(figure("buffers_query_ms_1m", list_ms, "ms", Bound::at_most, 2000));
    figures.push_back(figure("buffers_reply_mib_1m", static_cast<double>(list_bytes) / (1 << 20), "MiB"));
    figures.push_back(figure("summary_ms_during_buffers_1m", slowest_summary_ms, "ms", Bound::at_most, 500));
    figures.push_back(figure("summaries_during_buffers_1m", static_cast<double>(summaries), "answers"));

    // A process that dies holding a million buffers: from its death to a ledger without them.
    const auto killed = std::chrono::steady_clock::now();
    holder.signal(SIGKILL);
    (void)holder.wait_for(30s);
    testing::eventually([&] { return summary(monitor)["active_allocations"] == 0; }, 120s);
    figures.push_back(figure("reclaim_ms_1m",
                             std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - killed).count(),
                             "ms", Bound::at_most, 1000));
  }
  {
    // The timeline's ring (ADR 0025): what a sample costs in memory, measured as the heap a full
    // million-sample ring holds (malloc's own count: resident size would not see memory this
    // process freed before and reuses), and what one sampling of a busy server costs (8
    // processes on 64 devices, every series changed).
    constexpr std::size_t ring = std::size_t{1} << 20U;
    const auto heap_bytes = [] {
      const struct mallinfo2 info = ::mallinfo2();
      return info.uordblks + info.hblkhd;
    };
    const std::size_t before = heap_bytes();
    server::History history(ring);
    server::Summary busy;
    for (std::uint32_t device = 0; device < 64; ++device) busy.devices.push_back({.device = device});
    for (std::uint32_t pid = 1; pid <= 8; ++pid) {
      server::ProcessSummary process{.identity = {.pid = pid, .name = "worker"}};
      for (std::uint32_t device = 0; device < 64; ++device) process.devices[device] = {};
      busy.processes.push_back(process);
    }
    std::uint64_t round = 0;
    const auto change_all = [&] {
      ++round;
      for (server::ProcessSummary& process : busy.processes) {
        for (auto& [device, usage] : process.devices) {
          usage[index_of(BufferType::dram)].bytes = round * 4096;
          usage[index_of(BufferType::l1)].bytes = round * 2048;
        }
      }
    };
    std::int64_t now_ns = 0;
    const double sample_ns = median_ns_per_op(
        [&] {
          for (int i = 0; i < 100; ++i) {
            change_all();
            history.sample(busy, now_ns += 10'000'000);
          }
        },
        100, 9, 1, Timing::thread_cpu);
    while (history.samples_taken() < ring) {
      change_all();
      history.sample(busy, now_ns += 10'000'000);
    }
    const std::size_t after = heap_bytes();
    figures.push_back(figure("history_bytes_per_sample",
                             static_cast<double>(after - before) / static_cast<double>(ring), "B",
                             Bound::at_most, 64));
    figures.push_back(figure("history_sample_us_8x64", sample_ns / 1000.0, "us"));
  }
  return figures;
}

}  // namespace meshrt::bench
