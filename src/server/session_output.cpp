// A session's output and end: replies (a buffer list a page at a time), refusals, time limits,
// the activity log and the reclaim when the connection goes.
module;
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include <fmt/format.h>
#include <gsl/gsl>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;
import :session;
import :report;

namespace meshrt::server {

namespace {

// A buffer list goes out while the peer keeps less than this unread.
constexpr std::size_t listing_window = std::size_t{1} << 20U;
// Replies are split into frames under the frame limit; the client joins them.
constexpr std::size_t reply_chunk = protocol::max_payload_size - 16;
static_assert(reply_chunk >= BufferListing::max_entry_bytes);

}  // namespace

Session::Session(SessionContext& context, Peer peer, Clock::time_point accepted)
    : context_(context), peer_(std::move(peer)), accepted_(accepted),
      rate_(context.config.max_messages_per_second, accepted) {}

std::string Session::who() const { return fmt::format("pid {} ({})", peer_.pid, peer_.name); }

void Session::reject(ErrorCode code, const std::string& message, std::uint64_t& counter) {
  ++counter;
  log(fmt::format("{}: session closed: {}", who(), message));
  protocol::encode(protocol::ErrorMessage{code, message}, output_);
  closing_ = true;
}

void Session::send(const std::string& json) {
  std::size_t offset = 0;
  do {
    const std::size_t size = std::min(reply_chunk, json.size() - offset);
    protocol::encode(protocol::Reply{offset + size == json.size(), json.substr(offset, size)}, output_);
    offset += size;
  } while (offset < json.size());
  if (output_.size() - output_start_ > context_.config.max_pending_output) {
    ++context_.counters.dropped_slow_readers;
    log(fmt::format("{}: dropped: it stopped reading its replies ({} bytes pending)", who(),
                    output_.size() - output_start_));
    output_.clear();
    output_start_ = 0;
    closing_ = true;
  }
}

// Pages of a buffer list, while the peer keeps less than a window of it unread: memory stays
// bounded by the window, and each step of the event loop renders at most a window per peer.
void Session::continue_listing() {
  std::string text;
  while (listing_ && !closing_ && output_.size() - output_start_ < listing_window) {
    text.clear();
    listing_->render(text, reply_chunk, listing_now_ns_);
    protocol::encode(protocol::Reply{listing_->done(), text}, output_);
    listing_progress_ = Clock::now();
    if (listing_->done()) listing_.reset();
  }
}

void Session::sent(std::size_t bytes) {
  Expects(bytes <= output_.size() - output_start_);
  output_start_ += bytes;
  if (output_start_ == output_.size()) {
    output_.clear();
    output_start_ = 0;
  }
}

void Session::after_write() {
  if (!listing_) return;
  continue_listing();
  if (!listing_) handle_frames();  // what waited behind the list
}

bool Session::expired(Clock::time_point now) {
  if (!greeted_ && !closing_ && now - accepted_ > context_.config.hello_timeout) {
    ++context_.counters.timed_out_sessions;
    log(fmt::format("{}: said nothing for {} ms: closed", who(), context_.config.hello_timeout.count()));
    return true;
  }
  // A monitor that stopped reading in the middle of a buffer list would hold its copy forever.
  if (listing_ && now - listing_progress_ > context_.config.reply_stall_timeout) {
    ++context_.counters.dropped_slow_readers;
    log(fmt::format("{}: dropped: it stopped reading its buffer list ({} of {} buffers sent) for {} ms", who(),
                    listing_->sent(), listing_->size(), context_.config.reply_stall_timeout.count()));
    return true;
  }
  return false;
}

void Session::peer_closed() {
  if (partial_frame_bytes() == 0) return;
  ++context_.counters.truncated_sessions;
  log(fmt::format("{}: closed the connection in the middle of a frame ({} bytes of it)", who(), partial_frame_bytes()));
}

void Session::log_activity() {
  if (!context_.config.log_activity || activity_.empty()) return;
  for (const std::string& line : activity_.take_lines(who())) log(line);
}

void Session::end() {
  Expects(!ended_);
  ended_ = true;
  log_activity();
  if (session_ == 0) return;
  const SessionEnd how = !said_goodbye_ ? SessionEnd::disconnected : gave_up_ ? SessionEnd::gave_up : SessionEnd::goodbye;
  const std::int64_t ended_ns = wall_clock_ns();
  const Reclaim reclaim = context_.ledger.close_session(session_, how, ended_ns);
  ++context_.changes;
  if (context_.history != nullptr) {
    const MomentKind kind = reclaim.buffers == 0             ? MomentKind::process_exit
                            : how == SessionEnd::disconnected ? MomentKind::crash_reclaim
                                                              : MomentKind::leak_at_exit;
    context_.history->add({.time_ns = ended_ns,
                           .kind = kind,
                           .pid = peer_.pid,
                           .process = peer_.name,
                           .buffers = reclaim.buffers,
                           .bytes = reclaim.bytes,
                           .detail = reclaim.buffers == 0 ? std::string{} : report::reclaim_text(reclaim)});
  }
  if (reclaim.buffers == 0) {
    log(fmt::format("{}: {}", who(), how == SessionEnd::disconnected ? "disconnected" : "said goodbye"));
  } else if (how == SessionEnd::gave_up) {
    log(fmt::format("{}: exited before the server took all its events (it gave up on a slow server): {} buffers "
                    "({} bytes) lost at exit, not leaked: {}",
                    who(), reclaim.buffers, reclaim.bytes, report::reclaim_text(reclaim)));
  } else if (how == SessionEnd::goodbye) {
    log(fmt::format("{}: exited with {} live buffers ({} bytes), leaked: {}", who(), reclaim.buffers, reclaim.bytes,
                    report::reclaim_text(reclaim)));
  } else {
    log(fmt::format("{}: disconnected without Goodbye (crashed?): reclaimed {} leaked buffers ({} bytes): {}", who(),
                    reclaim.buffers, reclaim.bytes, report::reclaim_text(reclaim)));
  }
  for (const std::string& line : report::leak_site_lines(reclaim)) log(fmt::format("{}:{}", who(), line));
}

}  // namespace meshrt::server
