module;
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.tracking_client;

import meshrt.core;
import meshrt.protocol;
import meshrt.unix_socket;
import :server_connection;

namespace meshrt::detail {

namespace {

// The sockets of connected clients, so that a fork's child closes its copies: a parent's session
// must end when the parent does, not when its last child exits. Each slot holds a socket + 1
// (0: empty), so that zero-initialisation empties them all; a plain array of atomics, because
// the child's handler may only do what is async-signal-safe.
constexpr std::size_t max_tracked_sockets = 64;
std::array<std::atomic<int>, max_tracked_sockets> tracked_sockets{};

void remember_socket(int fd) {
  for (auto& slot : tracked_sockets) {
    int empty = 0;
    if (slot.compare_exchange_strong(empty, fd + 1)) return;
  }
}

void forget_socket(int fd) {
  for (auto& slot : tracked_sockets) {
    int held = fd + 1;
    if (slot.compare_exchange_strong(held, 0)) return;
  }
}

std::string system_message(int error) { return std::system_category().message(error); }

}  // namespace

void close_connections_in_child() {
  for (auto& slot : tracked_sockets) {
    const int held = slot.exchange(0);
    if (held > 0) ::close(held - 1);  // only the child's copy
  }
}

Result<void> ServerConnection::connect(const std::string& socket_path) {
  close();
  auto socket = unix_socket::connect(socket_path, unix_socket::Blocking::no);
  if (!socket) return tl::unexpected(std::move(socket.error()));
  fd_ = socket->release_ownership();
  remember_socket(fd_);
  outbound_.clear();
  return {};
}

void ServerConnection::close() {
  if (fd_ < 0) return;
  forget_socket(fd_);
  ::close(fd_);
  fd_ = -1;
  outbound_.clear();
}

Error ServerConnection::broken(std::string why) {
  close();
  return Error{ErrorCode::io_error, std::move(why)};
}

Result<void> ServerConnection::read_server() {
  std::array<std::byte, 4096> buffer{};
  std::vector<std::byte> input;
  for (;;) {
    const ssize_t got = ::recv(fd_, buffer.data(), buffer.size(), 0);
    if (got == 0) return tl::unexpected(broken("the server closed the session"));
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return tl::unexpected(broken(system_message(errno)));
    }
    input.insert(input.end(), buffer.begin(), buffer.begin() + got);
  }
  const auto next = protocol::next_frame(input);
  if (!next) return {};
  const std::optional<protocol::Frame>& frame = *next;
  if (!frame) return {};
  if (auto message = protocol::decode(*frame)) {
    if (const auto* error = std::get_if<protocol::ErrorMessage>(&*message)) {
      Error refused = broken(fmt::format("the server refused: {}", error->message));
      refused.code = ErrorCode::permission_denied;  // a refusal, not a lost connection
      return tl::unexpected(std::move(refused));
    }
  }
  return {};
}

Result<void> ServerConnection::pump_until(Clock::time_point deadline, std::size_t leave) {
  while (connected()) {
    const bool sending = !outbound_.all_sent();
    pollfd poller{fd_, static_cast<short>(POLLIN | (sending ? POLLOUT : 0)), 0};
    const auto remaining = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    const int ready = ::poll(&poller, 1, sending ? static_cast<int>(std::max<std::int64_t>(remaining.count(), 0)) : 0);
    if (ready < 0 && errno != EINTR) return tl::unexpected(broken(system_message(errno)));
    if ((poller.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      if (auto read = read_server(); !read) return read;
    }
    while (!outbound_.all_sent()) {
      const auto unsent = outbound_.unsent();
      const ssize_t sent = ::send(fd_, unsent.data(), unsent.size(), MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return tl::unexpected(broken(system_message(errno)));
      }
      outbound_.sent(static_cast<std::size_t>(sent));
    }
    if (outbound_.all_sent() || outbound_.pending() <= leave || Clock::now() >= deadline) return {};
  }
  return fail(ErrorCode::io_error, "not connected");
}

}  // namespace meshrt::detail
