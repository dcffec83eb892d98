module;
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <gsl/gsl>

module meshrt.protocol;

namespace meshrt::protocol {

std::size_t OutboundFrames::frame_end(std::size_t at) const {
  Expects(at + header_size <= bytes_.size());
  std::uint32_t payload = 0;
  for (std::size_t i = 0; i < 4; ++i) payload |= std::to_integer<std::uint32_t>(bytes_[at + i]) << (8U * i);
  return at + header_size + payload;
}

void OutboundFrames::sent(std::size_t count) {
  Expects(count <= pending());
  sent_ += count;
  if (sent_ == bytes_.size()) clear();
}

void OutboundFrames::clear() {
  bytes_.clear();
  sent_ = 0;
  keep_ = 0;
}

void OutboundFrames::compact() {
  constexpr std::size_t worth_it = std::size_t{1} << 20U;
  if (all_sent() || sent_ < worth_it || sent_ < bytes_.size() / 2) return;
  std::size_t boundary = 0;
  for (std::size_t next = frame_end(0); next <= sent_; next = frame_end(next)) boundary = next;
  bytes_.erase(bytes_.begin(), bytes_.begin() + static_cast<std::ptrdiff_t>(boundary));
  sent_ -= boundary;
  keep_ = keep_ > boundary ? keep_ - boundary : 0;
}

bool OutboundFrames::cut_unsent() {
  std::size_t boundary = 0;
  while (boundary < std::max(sent_, keep_)) boundary = frame_end(boundary);
  const bool cut = boundary < bytes_.size();
  bytes_.resize(boundary);
  if (sent_ == bytes_.size()) clear();
  return cut;
}

}  // namespace meshrt::protocol
