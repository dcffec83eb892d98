// Prometheus's door: http://HOST:PORT/metrics on a TCP listener of the server's loop. One request
// per connection, answered from the Ledger at that moment, then closed (ADR 0014).
module;
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

module meshrt.server:metrics_endpoint;

import meshrt.core;
import meshrt.unix_socket;
import :poller;

namespace meshrt::server {

class MetricsEndpoint {
 public:
  using Clock = std::chrono::steady_clock;
  // The exposition text, rendered when a scraper asks.
  using Render = std::function<std::string()>;

  // Listens on "HOST:PORT" (IPv4; port 0 picks a free one) and joins `poller`.
  [[nodiscard]] static Result<std::unique_ptr<MetricsEndpoint>> listen(const std::string& address, const Poller& poller,
                                                                       Render render);
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;
  MetricsEndpoint(MetricsEndpoint&&) = delete;
  MetricsEndpoint& operator=(MetricsEndpoint&&) = delete;
  ~MetricsEndpoint() = default;

  [[nodiscard]] int listener() const { return listener_.get(); }
  [[nodiscard]] std::uint16_t port() const { return port_; }
  [[nodiscard]] const std::string& host() const { return host_; }
  // True when `fd` is one of its scrapers' connections.
  [[nodiscard]] bool serves(int fd) const { return scrapers_.contains(fd); }

  // The listener is readable: takes the scrapers waiting (at most 64 at once; more are closed,
  // and retry).
  // `shed` refuses one connection when descriptors ran out (false when it could not).
  void accept_all(const std::function<bool(int listener)>& shed);
  // A scraper's connection is ready: reads its request, writes the answer, closes when done.
  void on_event(int fd, std::uint32_t events);
  // Scrapers that never finish their request within `timeout` are closed, like silent sessions.
  void close_silent(Clock::time_point now, std::chrono::milliseconds timeout);

 private:
  struct Scraper {
    FileDescriptor fd;
    Clock::time_point accepted{Clock::now()};
    std::string input;
    std::string output;
    std::size_t output_start{};
  };
  MetricsEndpoint(FileDescriptor listener, const Poller& poller, Render render)
      : listener_(std::move(listener)), poller_(poller), render_(std::move(render)) {}
  // False when the connection is done (answered, or broken).
  [[nodiscard]] bool serve(Scraper& scraper, std::uint32_t events);
  void close(int fd);

  FileDescriptor listener_;
  const Poller& poller_;
  Render render_;
  std::uint16_t port_{};
  std::string host_;
  std::map<int, std::unique_ptr<Scraper>> scrapers_;
};

}  // namespace meshrt::server
