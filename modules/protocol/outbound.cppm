// Frames waiting to be written to a peer, and the one rule that keeps a stream decodable: a
// frame is sent whole or not at all. Pure: the caller does the writing.
module;
#include <algorithm>
#include <cstddef>
#include <span>
#include <vector>

export module meshrt.protocol:outbound;

export namespace meshrt::protocol {

class OutboundFrames {
 public:
  // Encoders append whole frames here.
  [[nodiscard]] std::vector<std::byte>& frames() { return bytes_; }
  // The frames so far start a session (Hello, a snapshot): never dropped by cut_unsent().
  void keep_what_is_queued() { keep_ = bytes_.size(); }

  [[nodiscard]] std::span<const std::byte> unsent() const { return std::span(bytes_).subspan(sent_); }
  [[nodiscard]] std::size_t pending() const { return bytes_.size() - sent_; }
  [[nodiscard]] bool all_sent() const { return sent_ == bytes_.size(); }
  // Bytes cut_unsent() may drop: those queued beyond the kept session start and the sent part.
  [[nodiscard]] std::size_t droppable() const { return bytes_.size() - std::max(sent_, keep_); }
  // `count` bytes of unsent() were written. Once everything is, the queue empties.
  void sent(std::size_t count);
  void clear();

  // Forgets whole frames already sent, when they are most of a large queue: a peer that reads
  // steadily but never catches up must not make the queue grow without bound.
  void compact();
  // Drops every frame after the one being written (it may be partly sent: it stays whole) and
  // after the kept session start. True when something was dropped.
  bool cut_unsent();

 private:
  // Where the whole frame that starts at `at` ends.
  [[nodiscard]] std::size_t frame_end(std::size_t at) const;

  std::vector<std::byte> bytes_;
  std::size_t sent_{0};
  std::size_t keep_{0};
};

}  // namespace meshrt::protocol
