// One client's session, free of sockets: bytes in, frames applied to the Ledger in order, bytes
// out. The server's loop moves the bytes; tests feed frames and read the replies directly.
//
// The rules a session keeps: Hello first (a tracker or a monitor), then a tracker's events,
// names, device totals and snapshots (a snapshot's chunks and end only inside one), a monitor's
// queries only, and nothing after Goodbye. A frame out of order, malformed, over a limit or
// faster than the message rate closes the session with an Error that says why.
module;
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

module meshrt.server:session;

import meshrt.core;
import meshrt.protocol;
import :ledger;
import :server;
import :peer;
import :admission;
import :activity_log;
import :report;

namespace meshrt::server {

// What every session of one server shares.
struct SessionContext {
  Ledger& ledger;
  ConnectionCounters& counters;
  const ServerConfig& config;
  std::function<void(std::string_view)> log;
  std::function<ServerInfo()> info;
  // Frames applied and sessions ended: the periodic summary is logged only after a change.
  std::uint64_t changes{};
  // The timeline's moments go here (processes starting and ending); none kept when null.
  History* history{};
  // When an out-of-memory report last had the ledger scanned for the largest holdings (every
  // live allocation): at most one scan a second over all sessions, so a flood of reports from
  // many processes costs no more than one.
  std::optional<std::chrono::steady_clock::time_point> holdings_scanned{};
};

class Session {
 public:
  using Clock = std::chrono::steady_clock;

  Session(SessionContext& context, Peer peer, Clock::time_point accepted = Clock::now());
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  Session(Session&&) = delete;
  Session& operator=(Session&&) = delete;
  // Without end(): the server is stopping, and what the session holds stays in the final figures.
  ~Session() = default;

  // ---- bytes from the peer
  // Room for `bytes` more input (where a read goes), then how many arrived: every whole frame
  // is handled, in order, until the session closes or a buffer list starts going out.
  [[nodiscard]] std::span<std::byte> input_space(std::size_t bytes);
  void received(std::size_t bytes);
  // The same, copying: for callers that have the bytes already.
  void receive(std::span<const std::byte> bytes);
  // False while closing or while a buffer list goes out (what comes next waits in the socket).
  [[nodiscard]] bool wants_input() const { return !closing_ && listing_ == nullptr; }
  // Bytes of a frame begun and not finished: at the end of a connection, a truncated message.
  [[nodiscard]] std::size_t partial_frame_bytes() const { return input_.size() - input_start_; }

  // ---- bytes to the peer
  [[nodiscard]] std::span<const std::byte> unsent() const {
    return std::span<const std::byte>(output_).subspan(output_start_);
  }
  void sent(std::size_t bytes);
  // After a write: the buffer list goes on a page while the peer keeps up, and the frames that
  // waited behind it are handled once it is done.
  void after_write();
  // The peer closed its side; in the middle of a frame, that is a truncated message (counted
  // and logged: a process killed in the middle of a send leaves exactly this, so not malformed).
  void peer_closed();
  // Closing (an Error went out, or the peer was dropped): the connection ends once unsent() is.
  [[nodiscard]] bool closing() const { return closing_; }

  // ---- time
  // True when the session must close now because it never said Hello within the limit, or took
  // none of its buffer list for the stall limit; counted and logged here.
  [[nodiscard]] bool expired(Clock::time_point now);
  // Logs what was allocated and freed since the last call (when activity is logged at all).
  void log_activity();

  // The connection is gone: its session ends in the Ledger (what it still held is reclaimed,
  // and logged as a leak or a loss). Called once, last.
  void end();

  [[nodiscard]] const Peer& peer() const { return peer_; }
  [[nodiscard]] SessionId id() const { return session_; }
  [[nodiscard]] bool greeted() const { return greeted_; }
  [[nodiscard]] std::string who() const;

 private:
  void handle_frames();
  void handle(const protocol::Frame& frame);
  void apply(const protocol::Hello& hello);
  void apply(const protocol::DeviceInfo& info);
  void apply(const protocol::MeshBufferName& name);
  void apply(const protocol::EventBatch& batch);
  void apply(const protocol::SnapshotBegin& begin);
  void apply(const protocol::SnapshotChunk& chunk);
  void apply(const protocol::SnapshotEnd& end);
  void apply(const protocol::Goodbye& goodbye);
  void apply(const protocol::Query& query);
  void apply(const protocol::Reply& reply);
  void apply(const protocol::ErrorMessage& error);
  void apply(const protocol::CallStack& stack);
  void apply(const protocol::OutOfMemory& failure);
  void allocate(const protocol::AllocRecord& record);
  void free(const protocol::FreeRecord& record);
  [[nodiscard]] bool within_live_limit(std::uint64_t adding);
  void refuse_wrapping(const protocol::AllocRecord& record);
  // Tells the peer why, then closes once the message is out; `counter` says what kind of end.
  void reject(ErrorCode code, const std::string& message, std::uint64_t& counter);
  void send(const std::string& json);
  void continue_listing();
  void log(std::string_view line) const { context_.log(line); }

  SessionContext& context_;
  Peer peer_;
  Clock::time_point accepted_;
  MessageRate rate_;
  bool greeted_{false};
  protocol::ClientRole role_{protocol::ClientRole::tracker};
  SessionId session_{};  // 0 until a tracker says Hello (the ledger's ids start at 1)
  bool in_snapshot_{false};
  std::uint64_t snapshot_records_{};
  bool said_goodbye_{false};
  bool gave_up_{false};  // its Goodbye said events were left undelivered (the server was too slow)
  bool closing_{false};
  bool ended_{false};
  std::vector<std::byte> input_;
  std::size_t input_start_{};
  std::size_t space_offered_{};  // by input_space(), until received() says how much arrived
  std::vector<std::byte> output_;
  std::size_t output_start_{};
  // A buffer list still going out, a page whenever the output runs low; frames that arrive
  // meanwhile wait in `input_` until it is done, so replies stay in the order asked.
  std::unique_ptr<BufferListing> listing_;
  std::int64_t listing_now_ns_{};
  Clock::time_point listing_progress_;
  ActivityLog activity_;
  int unknown_frees_logged_{};
};

}  // namespace meshrt::server
