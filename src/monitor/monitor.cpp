module;
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.monitor;

import meshrt.core;
import meshrt.protocol;
import meshrt.unix_socket;

namespace meshrt::server {

namespace {

tl::unexpected<Error> lost(int error) {
  return fail(ErrorCode::io_error, fmt::format("lost the server: {}", std::system_category().message(error)));
}

}  // namespace

Result<Monitor> Monitor::connect(const std::string& socket_path) {
  auto socket = unix_socket::connect(socket_path, unix_socket::Blocking::yes);
  if (!socket) return tl::unexpected(std::move(socket.error()));
  Monitor monitor(std::move(*socket));
  std::vector<std::byte> hello;
  protocol::encode(protocol::Hello{.role = protocol::ClientRole::monitor,
                                   .claimed_pid = static_cast<std::uint32_t>(::getpid()),
                                   .process_name = "monitor"},
                   hello);
  if (auto sent = monitor.write(hello); !sent) return tl::unexpected(std::move(sent.error()));
  return monitor;
}

Result<std::string> Monitor::query(protocol::QueryKind kind, std::uint32_t pid, bool with_stacks) {
  std::vector<std::byte> request;
  protocol::encode(protocol::Query{kind, pid, with_stacks}, request);
  if (auto sent = write(request); !sent) return tl::unexpected(std::move(sent.error()));
  std::string json;
  for (;;) {
    auto message = read_message();
    if (!message) return tl::unexpected(std::move(message.error()));
    if (const auto* error = std::get_if<protocol::ErrorMessage>(&*message)) {
      return fail(error->code, fmt::format("the server refused: {}", error->message));
    }
    const auto* reply = std::get_if<protocol::Reply>(&*message);
    if (reply == nullptr) return fail(ErrorCode::protocol_error, "the server answered with something other than a reply");
    json += reply->json;
    if (reply->last) return json;
  }
}

Result<void> Monitor::write(std::span<const std::byte> bytes) const {
  while (!bytes.empty()) {
    const ssize_t sent = ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return lost(errno);
    }
    bytes = bytes.subspan(static_cast<std::size_t>(sent));
  }
  return {};
}

Result<protocol::Message> Monitor::read_message() {
  for (;;) {
    auto next = protocol::next_frame(std::span<const std::byte>(buffer_).subspan(start_));
    if (!next) return tl::unexpected(std::move(next.error()));
    if (const std::optional<protocol::Frame>& frame = *next) {
      auto decoded = protocol::decode(*frame);
      start_ += frame->frame_size;
      return decoded;  // replies and errors own their text: no view into the buffer escapes
    }
    if (start_ > 0) {
      buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<std::ptrdiff_t>(start_));
      start_ = 0;
    }
    std::array<std::byte, 65536> chunk{};
    const ssize_t got = ::recv(fd_.get(), chunk.data(), chunk.size(), 0);
    if (got == 0) return fail(ErrorCode::io_error, "the server closed the connection");
    if (got < 0) {
      if (errno == EINTR) continue;
      return lost(errno);
    }
    buffer_.insert(buffer_.end(), chunk.begin(), chunk.begin() + got);
  }
}

}  // namespace meshrt::server
