// The session with the server, as the sender thread speaks it: events encoded in frames, the
// snapshot a session starts with, connecting, and what a lost or slow server costs.
module;
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>
#include <gsl/gsl>

module meshrt.tracking_client;

import meshrt.core;
import meshrt.protocol;
import :client_engine;
import :event_lanes;
import :server_connection;

namespace meshrt {

void TrackingClient::Engine::warn(const std::string& line) const {
  if (options.warn) {
    options.warn(line);
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
}

void TrackingClient::Engine::flush_pending() {
  if (pending.empty()) return;
  protocol::encode_events(next_sequence, pending, out, record_format());
  next_sequence += pending.size();
  pending.clear();
}

void TrackingClient::Engine::encode(const protocol::EventRecord& record) {
  pending.push_back(record);
  if (pending.size() >= frame_records) flush_pending();
}

void TrackingClient::Engine::send_alloc(const protocol::AllocRecord& record, const std::optional<std::string>& name) {
  if (name) {
    flush_pending();
    protocol::encode(protocol::MeshBufferName{record.mesh_buffer, *name}, out);
  }
  encode(protocol::EventRecord::of(record));
}

void TrackingClient::Engine::encode_session_start() {
  outbound.clear();
  if (stack_book) stack_book->new_session();
  protocol::encode(protocol::Hello{.protocol_version = protocol::version,
                                   .role = protocol::ClientRole::tracker,
                                   .claimed_pid = static_cast<std::uint32_t>(::getpid()),
                                   .process_name = options.process_name},
                   out);
  encode_snapshot();
}

void TrackingClient::Engine::encode_snapshot() {
  if (!devices.empty()) {
    protocol::DeviceInfo info;
    for (const auto& [id, totals] : devices) info.devices.push_back(totals);
    protocol::encode(info, out);
  }
  // Only live groups have names here: the snapshot carries exactly the names still in use.
  for (const auto& [mesh_buffer, name] : table.live_names()) {
    protocol::encode(protocol::MeshBufferName{mesh_buffer, name}, out);
  }
  if (stack_book) stack_book->tell(out);  // the stacks the snapshot's records name
  protocol::encode(protocol::SnapshotBegin{}, out);
  std::vector<protocol::AllocRecord> chunk;
  chunk.reserve(std::min<std::uint64_t>(table.live_device_buffers(), protocol::max_records));
  std::uint64_t records = 0;
  table.for_each_live_record([&](const protocol::AllocRecord& record) {
    chunk.push_back(record);
    ++records;
    if (chunk.size() == protocol::max_records) {
      protocol::encode_snapshot_chunk(chunk, out, record_format());
      chunk.clear();
    }
  });
  if (!chunk.empty()) protocol::encode_snapshot_chunk(chunk, out, record_format());
  protocol::encode(protocol::SnapshotEnd{next_sequence, records}, out);
  outbound.keep_what_is_queued();
  if (stack_book) stack_book->keep();
  need_snapshot = false;
  const std::scoped_lock lock(mutex);
  ++status.snapshots;
}

void TrackingClient::Engine::drop_pending() {
  if (!outbound.cut_unsent()) return;
  if (stack_book) stack_book->forget_unkept();  // told again with the snapshot
  need_snapshot = true;
  const std::scoped_lock lock(mutex);
  ++status.overflows;
}

void TrackingClient::Engine::disconnect(const Error& why) {
  connection.close();
  need_snapshot = true;
  next_connect = Clock::now() + options.reconnect_interval;
  if (why.code == ErrorCode::permission_denied) warned = false;  // a refusal matters more than "lost"
  if (!warned) {
    warn(fmt::format("meshrt: tracking: lost the allocation server at {} ({}); tracking continues in-process and "
                     "will resynchronise when it is back",
                     options.socket_path, why.message));
    warned = true;
  }
  const std::scoped_lock lock(mutex);
  status.connected = false;
}

void TrackingClient::Engine::try_connect() {
  if (Clock::now() < next_connect) return;
  next_connect = Clock::now() + options.reconnect_interval;
  if (auto connected = connection.connect(options.socket_path); !connected) {
    {
      const std::scoped_lock lock(mutex);
      ++status.connect_attempts_refused;
    }
    if (!warned) {
      const Error& error = connected.error();
      warn(error.code == ErrorCode::invalid_argument
               ? fmt::format("meshrt: tracking: {}", error.message)
               : fmt::format("meshrt: tracking: {}; the application runs on with in-process tracking and will "
                             "connect when the server {}",
                             error.message, error.code == ErrorCode::limit_exceeded ? "accepts connections again" : "appears"));
      warned = true;
    }
    return;
  }
  encode_session_start();
  if (warned) {
    warn(fmt::format("meshrt: tracking: connected to the allocation server at {}; resynchronised {} live buffers",
                     options.socket_path, table.live_device_buffers()));
    warned = false;
  }
  const std::scoped_lock lock(mutex);
  status.connected = true;
  ++status.connections;
}

bool TrackingClient::Engine::pump_until(Clock::time_point deadline, std::size_t leave) {
  if (!connected()) return false;
  auto pumped = connection.pump_until(deadline, leave);
  if (!pumped) disconnect(pumped.error());
  return pumped.has_value();
}

}  // namespace meshrt
