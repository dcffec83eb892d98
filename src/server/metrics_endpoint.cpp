module;
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.server;

import meshrt.core;
import meshrt.unix_socket;
import :metrics_endpoint;
import :metrics;

namespace meshrt::server {

namespace {

constexpr std::size_t max_scrapers = 64;

std::string describe_errno(int error) { return std::system_category().message(error); }

}  // namespace

Result<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::listen(const std::string& text, const Poller& poller,
                                                                 Render render) {
  auto address = metrics::parse_listen_address(text);
  if (!address) return tl::unexpected(std::move(address.error()));
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_port = htons(address->port);
  if (::inet_pton(AF_INET, address->host.c_str(), &in.sin_addr) != 1) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("bad metrics address '{}': '{}' is not an IPv4 address", text, address->host));
  }
  FileDescriptor fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fail(ErrorCode::io_error, fmt::format("socket: {}", describe_errno(errno)));
  const int one = 1;
  (void)::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&in), sizeof(in)) != 0) {
    return fail(ErrorCode::io_error, fmt::format("cannot serve metrics on {}: {}", text, describe_errno(errno)));
  }
  if (::listen(fd.get(), 64) != 0) return fail(ErrorCode::io_error, fmt::format("listen: {}", describe_errno(errno)));
  std::unique_ptr<MetricsEndpoint> endpoint(new MetricsEndpoint(std::move(fd), poller, std::move(render)));
  sockaddr_in bound{};
  socklen_t length = sizeof(bound);
  (void)::getsockname(endpoint->listener(), reinterpret_cast<sockaddr*>(&bound), &length);
  endpoint->port_ = ntohs(bound.sin_port);
  std::array<char, INET_ADDRSTRLEN> host{};
  endpoint->host_ = ::inet_ntop(AF_INET, &bound.sin_addr, host.data(), host.size()) != nullptr ? host.data() : "?";
  if (auto watched = poller.add(endpoint->listener(), EPOLLIN); !watched) return tl::unexpected(watched.error());
  return endpoint;
}

void MetricsEndpoint::accept_all(const std::function<bool(int listener)>& shed) {
  for (;;) {
    FileDescriptor fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd.valid()) {
      if ((errno == EMFILE || errno == ENFILE) && shed(listener_.get())) continue;
      return;
    }
    if (scrapers_.size() >= max_scrapers) continue;  // closed at once: scrapers retry
    const int key = fd.get();
    if (!poller_.add(key, EPOLLIN)) continue;
    auto scraper = std::make_unique<Scraper>();
    scraper->fd = std::move(fd);
    scrapers_.emplace(key, std::move(scraper));
  }
}

void MetricsEndpoint::on_event(int fd, std::uint32_t events) {
  const auto found = scrapers_.find(fd);
  if (found != scrapers_.end() && !serve(*found->second, events)) close(fd);
}

bool MetricsEndpoint::serve(Scraper& h, std::uint32_t events) {
  if (h.output.empty() && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0U) {
    std::array<char, 4096> chunk{};
    bool peer_done = false;
    for (;;) {
      const ssize_t got = ::recv(h.fd.get(), chunk.data(), chunk.size(), 0);
      if (got == 0) {  // the peer shut down its side: answer what it sent, if it is a whole head
        peer_done = true;
        break;
      }
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return false;
      }
      h.input.append(chunk.data(), static_cast<std::size_t>(got));
      if (h.input.size() > metrics::max_request_bytes) break;
    }
    const auto head_end = metrics::end_of_head(h.input);
    if (head_end == std::string::npos && h.input.size() <= metrics::max_request_bytes) {
      return !peer_done;  // wait for the rest, unless no more is coming
    }
    const metrics::Response response =
        head_end == std::string::npos
            ? metrics::Response{431, "Request Header Fields Too Large", "text/plain; charset=utf-8", "too long\n"}
            : metrics::respond(std::string_view(h.input).substr(0, head_end), render_);
    h.output = metrics::serialize(response);
    if (!poller_.change(h.fd.get(), EPOLLOUT)) return false;
  }
  while (h.output_start < h.output.size()) {
    const ssize_t sent =
        ::send(h.fd.get(), h.output.data() + h.output_start, h.output.size() - h.output_start, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN || errno == EWOULDBLOCK;
    }
    h.output_start += static_cast<std::size_t>(sent);
  }
  return h.output.empty();  // answered in full: close
}

void MetricsEndpoint::close(int fd) {
  poller_.remove(fd);
  scrapers_.erase(fd);
}

void MetricsEndpoint::close_silent(Clock::time_point now, std::chrono::milliseconds timeout) {
  std::vector<int> silent;
  for (const auto& [fd, scraper] : scrapers_) {
    if (now - scraper->accepted > timeout) silent.push_back(fd);
  }
  for (const int fd : silent) close(fd);
}

}  // namespace meshrt::server
