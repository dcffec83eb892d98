// The server's epoll set: which descriptors it waits on, for what.
module;
#include <cerrno>
#include <cstdint>
#include <span>

#include <sys/epoll.h>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.server:poller;

import meshrt.core;
import meshrt.unix_socket;

namespace meshrt::server {

class Poller {
 public:
  [[nodiscard]] static Result<Poller> create() {
    Poller poller(FileDescriptor(::epoll_create1(EPOLL_CLOEXEC)));
    if (!poller.epoll_.valid()) return failure("epoll_create1");
    return poller;
  }
  [[nodiscard]] Result<void> add(int fd, std::uint32_t events) const { return control(EPOLL_CTL_ADD, fd, events); }
  [[nodiscard]] Result<void> change(int fd, std::uint32_t events) const { return control(EPOLL_CTL_MOD, fd, events); }
  void remove(int fd) const { (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr); }
  // Waits for events, at most timeout_ms (-1: for ever); an empty span when interrupted by a
  // signal or timed out.
  [[nodiscard]] Result<std::span<const epoll_event>> wait(std::span<epoll_event> events, int timeout_ms = -1) const {
    const int ready = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
    if (ready < 0) {
      if (errno == EINTR) return std::span<const epoll_event>{};
      return failure("epoll_wait");
    }
    return std::span<const epoll_event>(events).first(static_cast<std::size_t>(ready));
  }

 private:
  explicit Poller(FileDescriptor epoll) : epoll_(std::move(epoll)) {}
  [[nodiscard]] Result<void> control(int op, int fd, std::uint32_t events) const {
    epoll_event event{};
    event.events = events;
    event.data.fd = fd;
    if (::epoll_ctl(epoll_.get(), op, fd, &event) != 0) return failure("epoll_ctl");
    return {};
  }
  static tl::unexpected<Error> failure(const char* what) {
    return fail(ErrorCode::io_error, fmt::format("{}: {}", what, std::system_category().message(errno)));
  }

  FileDescriptor epoll_;
};

}  // namespace meshrt::server
