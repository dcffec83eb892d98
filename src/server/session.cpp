// A session's input: frames in order, the rules they must keep, and what each does to the Ledger.
module;
#include <algorithm>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/format.h>
#include <gsl/gsl>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;
import :session;
import :report;

namespace meshrt::server {

namespace {

constexpr std::size_t compact_input_after = std::size_t{256} << 10U;
constexpr int unknown_frees_logged_per_session = 5;
constexpr std::size_t holders_named = 5;  // in an out-of-memory moment
constexpr std::chrono::seconds holdings_scan_interval{1};

}  // namespace

std::span<std::byte> Session::input_space(std::size_t bytes) {
  Expects(space_offered_ == 0);
  const std::size_t old_size = input_.size();
  input_.resize(old_size + bytes);
  space_offered_ = bytes;
  return std::span(input_).subspan(old_size);
}

void Session::received(std::size_t bytes) {
  Expects(bytes <= space_offered_);
  input_.resize(input_.size() - (space_offered_ - bytes));  // keep only what arrived
  space_offered_ = 0;
  if (bytes > 0) handle_frames();
}

void Session::receive(std::span<const std::byte> bytes) {
  const std::span<std::byte> space = input_space(bytes.size());
  std::memcpy(space.data(), bytes.data(), bytes.size());
  received(bytes.size());
}

void Session::handle_frames() {
  while (!closing_ && listing_ == nullptr) {
    const auto pending = std::span<const std::byte>(input_).subspan(input_start_);
    auto next = protocol::next_frame(pending, context_.config.max_payload);
    if (!next) {
      reject(next.error().code, next.error().message, context_.counters.malformed_messages);
      break;
    }
    const std::optional<protocol::Frame>& frame = *next;
    if (!frame) break;  // a partial frame: wait for more bytes
    handle(*frame);
    input_start_ += frame->frame_size;
  }
  if (input_start_ == input_.size()) {
    input_.clear();
    input_start_ = 0;
  } else if (input_start_ > compact_input_after) {
    input_.erase(input_.begin(), input_.begin() + static_cast<std::ptrdiff_t>(input_start_));
    input_start_ = 0;
  }
}

void Session::handle(const protocol::Frame& frame) {
  if (!rate_.take()) {
    reject(ErrorCode::limit_exceeded,
           fmt::format("more than {} messages a second from one session, the server's limit (raise it with "
                       "--max-messages-per-second)",
                       context_.config.max_messages_per_second),
           context_.counters.rejected_sessions);
    return;
  }
  auto decoded = protocol::decode(frame);
  if (!decoded) {
    reject(decoded.error().code, decoded.error().message, context_.counters.malformed_messages);
    return;
  }
  const auto out_of_order = [&](std::string_view why) {
    reject(ErrorCode::protocol_error, fmt::format("{} message out of order: {}", protocol::to_string(frame.type), why),
           context_.counters.malformed_messages);
  };
  if (said_goodbye_) return out_of_order("the session already said Goodbye");
  if (!greeted_ && frame.type != protocol::MessageType::hello) return out_of_order("the first message must be Hello");
  const bool tracker = role_ == protocol::ClientRole::tracker;
  const bool tracker_message = frame.type != protocol::MessageType::hello &&
                               frame.type != protocol::MessageType::query &&
                               frame.type != protocol::MessageType::goodbye;
  if (greeted_ && tracker_message && !tracker) return out_of_order("a monitor may only query");
  const bool snapshot_part = frame.type == protocol::MessageType::snapshot_chunk ||
                             frame.type == protocol::MessageType::snapshot_end;
  if (in_snapshot_ != snapshot_part && tracker_message) {
    return out_of_order(in_snapshot_ ? "a snapshot is in progress" : "no snapshot was begun");
  }
  ++context_.changes;
  std::visit([&](const auto& message) { apply(message); }, *decoded);
}

void Session::apply(const protocol::Hello& hello) {
  if (greeted_) {
    reject(ErrorCode::protocol_error, "Hello message out of order: the session already said Hello",
           context_.counters.malformed_messages);
    return;
  }
  if (hello.protocol_version != protocol::version) {
    reject(ErrorCode::protocol_error,
           fmt::format("protocol version {} is not supported: this server speaks version {}", hello.protocol_version,
                       protocol::version),
           context_.counters.rejected_sessions);
    return;
  }
  if (hello.claimed_pid != 0 && hello.claimed_pid != peer_.pid) {
    reject(ErrorCode::permission_denied,
           fmt::format("the client claims pid {} but the kernel says it is pid {}: identity comes from the kernel",
                       hello.claimed_pid, peer_.pid),
           context_.counters.rejected_sessions);
    return;
  }
  greeted_ = true;
  role_ = hello.role;
  if (peer_.name.empty()) peer_.name = printable(hello.process_name);
  if (role_ == protocol::ClientRole::monitor) {
    ++context_.counters.monitors;
    return;
  }
  ++context_.counters.sessions_opened;
  session_ = context_.ledger.open_session(SessionIdentity{peer_.pid, peer_.uid, peer_.start_time, peer_.name});
  if (context_.history != nullptr) {
    context_.history->add(
        {.time_ns = wall_clock_ns(), .kind = MomentKind::process_start, .pid = peer_.pid, .process = peer_.name});
  }
  log(fmt::format("{}: connected (uid {}, session {})", who(), peer_.uid, session_));
}

void Session::apply(const protocol::DeviceInfo& info) {
  for (const protocol::DeviceTotals& device : info.devices) context_.ledger.set_device_totals(session_, device);
}

void Session::apply(const protocol::MeshBufferName& name) {
  if (context_.ledger.name_count(session_) >= context_.config.max_names_per_session) {
    reject(ErrorCode::limit_exceeded,
           fmt::format("more than {} mesh buffer names in one process, the server's limit (raise it with "
                       "--max-names-per-process)",
                       context_.config.max_names_per_session),
           context_.counters.rejected_sessions);
    return;
  }
  context_.ledger.name_mesh_buffer(session_, name.mesh_buffer, printable(name.name));
}

bool Session::within_live_limit(std::uint64_t adding) {
  if (context_.ledger.live_allocations(session_) + adding <= context_.config.max_live_per_session) return true;
  reject(ErrorCode::limit_exceeded,
         fmt::format("more than {} live allocations in one process, the server's limit (raise it with "
                     "--max-live-per-process)",
                     context_.config.max_live_per_session),
         context_.counters.rejected_sessions);
  return false;
}

void Session::apply(const protocol::EventBatch& batch) {
  std::uint64_t allocating = 0;
  for (std::size_t i = 0; i < batch.records.size(); ++i) {
    const protocol::EventRecord record = batch.records[i];
    if (!record.is_free) allocating += record.alloc.device_count;
  }
  if (!within_live_limit(allocating)) return;
  if (!context_.ledger.check_sequence(session_, batch.first_sequence, batch.records.size())) {
    log(fmt::format("{}: sequence gap: batch starts at event {}, not where the last ended; events were lost", who(),
                    batch.first_sequence));
  }
  for (std::size_t i = 0; i < batch.records.size() && !closing_; ++i) {
    const protocol::EventRecord record = batch.records[i];
    if (record.is_free) {
      free(record.free);
    } else {
      allocate(record.alloc);
    }
  }
}

// No real client comes near 2^64 bytes in use: a record that would pass it is malformed.
void Session::refuse_wrapping(const protocol::AllocRecord& record) {
  reject(ErrorCode::protocol_error,
         fmt::format("malformed allocation: {} buffers of {} bytes from buffer {} would take a total past 2^64 bytes",
                     record.device_count, record.size, record.buffer),
         context_.counters.malformed_messages);
}

void Session::allocate(const protocol::AllocRecord& record) {
  if (!context_.ledger.apply_alloc(session_, record)) return refuse_wrapping(record);
  if (!context_.config.log_activity) return;
  for (std::uint32_t device = record.device; device < record.device + record.device_count; ++device) {
    activity_.allocated(record.category, device, record.size);
  }
}

void Session::free(const protocol::FreeRecord& record) {
  const FreeOutcome outcome = context_.ledger.apply_free(session_, record);
  if (context_.config.log_activity) {
    for (std::uint64_t mask = outcome.freed_mask; mask != 0; mask &= mask - 1) {
      activity_.freed(outcome.category, outcome.first_device + static_cast<std::uint32_t>(std::countr_zero(mask)), outcome.size);
    }
  }
  if (outcome.unknown_frees + outcome.double_frees == 0) return;
  if (unknown_frees_logged_++ < unknown_frees_logged_per_session) {
    log(fmt::format("{}: {} for buffer {}{}", who(),
                    outcome.double_frees > 0 ? "Double deallocation" : "Deallocation for unknown buffer",
                    record.buffer,
                    unknown_frees_logged_ == unknown_frees_logged_per_session ? " (further ones are counted, not logged)"
                                                                              : ""));
  }
}

void Session::apply(const protocol::SnapshotBegin& /*begin*/) {
  context_.ledger.begin_snapshot(session_);
  in_snapshot_ = true;
  snapshot_records_ = 0;
}

void Session::apply(const protocol::SnapshotChunk& chunk) {
  std::uint64_t buffers = 0;
  for (std::size_t i = 0; i < chunk.records.size(); ++i) buffers += chunk.records[i].alloc.device_count;
  if (!within_live_limit(buffers)) return;
  for (std::size_t i = 0; i < chunk.records.size(); ++i) {
    if (!context_.ledger.apply_snapshot_record(session_, chunk.records[i].alloc)) {
      return refuse_wrapping(chunk.records[i].alloc);
    }
  }
  snapshot_records_ += chunk.records.size();
}

void Session::apply(const protocol::SnapshotEnd& end) {
  if (end.record_count != snapshot_records_) {
    reject(ErrorCode::protocol_error,
           fmt::format("malformed SnapshotEnd frame: says {} records, the chunks carried {}", end.record_count,
                       snapshot_records_),
           context_.counters.malformed_messages);
    return;
  }
  context_.ledger.end_snapshot(session_, end.next_sequence);
  in_snapshot_ = false;
  if (snapshot_records_ > 0) log(fmt::format("{}: resynchronised: {} live buffers", who(), snapshot_records_));
}

void Session::apply(const protocol::Goodbye& goodbye) {
  said_goodbye_ = true;
  gave_up_ = !goodbye.complete;
}

void Session::apply(const protocol::Query& query) {
  switch (query.kind) {
    case protocol::QueryKind::summary:
      send(report::summary_json(context_.ledger.summary(), context_.counters, context_.info()));
      return;
    case protocol::QueryKind::buffers:
      listing_ = std::make_unique<BufferListing>(context_.ledger.list_buffers(query.pid, query.with_stacks));
      listing_now_ns_ = wall_clock_ns();
      continue_listing();
      return;
    case protocol::QueryKind::verify:
      send(report::verification_json(context_.ledger.verify()));
      return;
    case protocol::QueryKind::leaks:
      send(report::leaks_json(context_.ledger.leak_reports(query.pid), wall_clock_ns()));
      return;
    case protocol::QueryKind::timeline:
      send(report::timeline_json(context_.history != nullptr ? *context_.history : History(0, 0), query.pid,
                                 wall_clock_ns()));
      return;
  }
}

void Session::apply(const protocol::CallStack& stack) {
  (void)context_.ledger.add_call_stack(session_, stack, context_.config.max_stacks_per_session);
}

void Session::apply(const protocol::OutOfMemory& failure) {
  const std::string message = printable(failure.message);
  const std::int64_t now_ns = wall_clock_ns();
  // The process named its own largest buffers; the server adds who holds the device across every
  // process, with the call sites their stacks give (ADR 0025).
  std::string holders;
  const Clock::time_point now = Clock::now();
  if (!context_.holdings_scanned || now - *context_.holdings_scanned >= holdings_scan_interval) {
    context_.holdings_scanned = now;
    for (const Holding& holding : context_.ledger.largest_holdings(failure.device, failure.type, holders_named)) {
      holders += fmt::format("{}pid {} ({}) mesh buffer {}{} {} bytes{}", holders.empty() ? "" : ", ", holding.pid,
                             printable(holding.process), holding.mesh_buffer,
                             holding.mesh_buffer_name.empty() ? "" : fmt::format(" '{}'", printable(holding.mesh_buffer_name)),
                             holding.bytes, holding.call_site.empty() ? "" : " at " + printable(holding.call_site));
    }
    if (!holders.empty()) holders = fmt::format("; largest holders of device {} {}: {}", failure.device, to_string(failure.type), holders);
  }
  log(fmt::format("{}: out of memory on device {} {}: {}{}", who(), failure.device, to_string(failure.type), message, holders));
  if (context_.history == nullptr) return;
  context_.history->add({.time_ns = now_ns,
                         .kind = MomentKind::out_of_memory,
                         .pid = peer_.pid,
                         .process = peer_.name,
                         .buffers = 0,
                         .bytes = failure.requested,
                         .detail = fmt::format("device {} {}: {} bytes asked (aligned to the banks), largest free block {} bytes per bank; {}{}",
                                               failure.device, to_string(failure.type), failure.requested,
                                               failure.largest_free_block, message, holders)});
}

void Session::apply(const protocol::Reply& /*reply*/) {
  reject(ErrorCode::protocol_error, "Reply message out of order: only the server sends replies",
         context_.counters.malformed_messages);
}

void Session::apply(const protocol::ErrorMessage& /*error*/) {
  reject(ErrorCode::protocol_error, "Error message out of order: only the server sends errors",
         context_.counters.malformed_messages);
}

}  // namespace meshrt::server
