module;
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

module meshrt.server;

import meshrt.core;
import meshrt.unix_socket;
import :admission;

namespace meshrt::server {

std::optional<Refusal> Admission::admit(const Peer& peer, std::size_t sessions_open) {
  if (peer.uid != ::getuid() && peer.uid != 0 && !group_) {
    return Refusal{ErrorCode::permission_denied,
                   fmt::format("uid {} may not use this server (it serves uid {}; start it with --group)", peer.uid,
                               ::getuid())};
  }
  if (sessions_open >= config_.max_sessions) {
    return Refusal{ErrorCode::limit_exceeded,
                   fmt::format("the server already has {} sessions, its limit (raise it with --max-sessions)",
                               config_.max_sessions)};
  }
  std::size_t& open = per_process_[peer.pid];
  if (open >= config_.max_sessions_per_process) {
    if (open == 0) per_process_.erase(peer.pid);
    return Refusal{ErrorCode::limit_exceeded,
                   fmt::format("pid {} already has {} connections, the limit for one process (raise it with "
                               "--max-sessions-per-process)",
                               peer.pid, config_.max_sessions_per_process)};
  }
  ++open;
  return std::nullopt;
}

void Admission::leave(std::uint32_t pid) {
  if (const auto count = per_process_.find(pid); count != per_process_.end() && --count->second == 0) {
    per_process_.erase(count);
  }
}

bool MessageRate::take(Clock::time_point now) {
  tokens_ = std::min(per_second_, tokens_ + per_second_ * std::chrono::duration<double>(now - at_).count());
  at_ = now;
  if (tokens_ < 1) return false;
  tokens_ -= 1;
  return true;
}

DescriptorReserve::DescriptorReserve() : spare_(::open("/dev/null", O_RDONLY | O_CLOEXEC)) {}

bool DescriptorReserve::shed_one_connection(int listener) {
  ++shortages_;
  if (!spare_.valid()) spare_ = FileDescriptor(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!spare_.valid()) return false;
  spare_.reset();
  {
    const FileDescriptor refused(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
  }  // closed here, before the spare is taken back
  spare_ = FileDescriptor(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  return true;
}

}  // namespace meshrt::server
