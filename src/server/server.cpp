// The server's event loop: the Unix listener, the sessions' sockets, /metrics, the timer that
// logs activity and closes what timed out, and the stop signal. Sessions do everything else.
module;
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;
import meshrt.unix_socket;
import :poller;
import :peer;
import :admission;
import :session;
import :metrics_endpoint;
import :metrics;
import :report;

namespace meshrt::server {

namespace {

using namespace std::chrono_literals;

constexpr std::size_t read_chunk = std::size_t{256} << 10U;
constexpr std::size_t max_reads_per_wakeup = 16;  // fairness between clients

tl::unexpected<Error> io_failure(std::string_view what, int error) {
  return fail(ErrorCode::io_error, fmt::format("{}: {}", what, std::system_category().message(error)));
}

}  // namespace

// One connected client: its socket and its session.
struct Connection {
  Connection(FileDescriptor socket, SessionContext& context, Peer peer)
      : fd(std::move(socket)), session(context, std::move(peer)) {}
  FileDescriptor fd;
  Session session;
  std::uint32_t interest{EPOLLIN};  // what the poller waits for on fd
};

struct Server::Loop {
  ServerConfig config;
  std::optional<gid_t> group;
  Poller poller;
  FileDescriptor listener;
  FileDescriptor wake;
  FileDescriptor timer;
  FileDescriptor signals;
  std::unique_ptr<MetricsEndpoint> metrics_endpoint;
  std::int64_t start_time_seconds{wall_clock_ns() / 1'000'000'000};
  std::chrono::steady_clock::time_point started{std::chrono::steady_clock::now()};
  Ledger ledger;
  History history;
  ConnectionCounters counters;
  SessionContext context{ledger, counters, config, [this](std::string_view line) { log(line); },
                         [this] { return info(); }};
  std::chrono::steady_clock::time_point last_sample{};
  std::uint64_t changes_at_last_sample{};
  Admission admission{config, group};
  DescriptorReserve reserve;
  std::map<int, std::unique_ptr<Connection>> connections;
  std::chrono::steady_clock::time_point last_summary{started};
  std::uint64_t changes_at_last_summary{};
  bool running{true};

  Loop(ServerConfig server_config, std::optional<gid_t> gid, Poller epoll)
      : config(std::move(server_config)), group(gid), poller(std::move(epoll)), history(config.history_samples) {
    ledger.set_leak_report_limit(config.leak_reports);
    context.history = &history;
  }

  // The timeline's sample: taken when something changed, at most every History::min_interval.
  // Called after each round of events and on the timer, so a last change is not left unsampled.
  void sample_history(std::chrono::steady_clock::time_point now) {
    if (context.changes == changes_at_last_sample || now - last_sample < History::min_interval) return;
    history.sample(ledger.summary(), wall_clock_ns());
    last_sample = now;
    changes_at_last_sample = context.changes;
  }

  void log(std::string_view line) const {
    if (config.log) {
      config.log(line);
      return;
    }
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }

  [[nodiscard]] ServerInfo info() const {
    return ServerInfo{static_cast<std::uint32_t>(::getpid()), config.socket_path,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(),
                      wall_clock_ns()};
  }

  // Out of descriptors: refuses the connection waiting on `from`. False when it could not.
  bool shed_connection(int from) {
    const bool shed = reserve.shed_one_connection(from);
    ++counters.rejected_sessions;
    if (reserve.shortages() == 1 || reserve.shortages() % 1000 == 0) {
      log(fmt::format("out of file descriptors: refusing connections ({} so far)", reserve.shortages()));
    }
    return shed;
  }

  // Refuses a connection at the door: one Error frame, written without waiting, then closed. It
  // never takes a slot, so a flood of refusals cannot crowd out other clients.
  void refuse(const FileDescriptor& fd, const Peer& peer, const Refusal& refusal) {
    ++counters.rejected_sessions;
    if (counters.rejected_sessions <= 5 || counters.rejected_sessions % 1000 == 0) {
      log(fmt::format("pid {} ({}): refused: {} ({} refused so far)", peer.pid, peer.name, refusal.message,
                      counters.rejected_sessions));
    }
    std::vector<std::byte> bytes;
    protocol::encode(protocol::ErrorMessage{refusal.code, refusal.message}, bytes);
    (void)::send(fd.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  }

  void accept_all() {
    for (;;) {
      FileDescriptor fd(::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!fd.valid()) {
        if ((errno == EMFILE || errno == ENFILE) && shed_connection(listener.get())) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          log(fmt::format("accept: {}", std::system_category().message(errno)));
        }
        return;
      }
      auto peer = identify_peer(fd.get());
      if (!peer) {
        log(peer.error().message);
        continue;
      }
      if (const auto refusal = admission.admit(*peer, connections.size())) {
        refuse(fd, *peer, *refusal);
        continue;
      }
      const int key = fd.get();
      const std::uint32_t pid = peer->pid;
      if (!poller.add(key, EPOLLIN)) {
        admission.leave(pid);
        continue;
      }
      connections.emplace(key, std::make_unique<Connection>(std::move(fd), context, std::move(*peer)));
    }
  }

  // While a buffer list goes out, what the peer sends next waits in its socket (read after).
  void update_interest(Connection& c) const {
    std::uint32_t events = c.session.wants_input() ? static_cast<std::uint32_t>(EPOLLIN) : 0U;
    if (!c.session.unsent().empty()) events |= EPOLLOUT;
    if (events == c.interest) return;
    c.interest = events;
    if (auto changed = poller.change(c.fd.get(), events); !changed) log(changed.error().message);
  }

  // Reads what is there (a bounded amount, for fairness); the session applies every whole frame.
  // False when the connection is finished.
  bool on_readable(Connection& c) {
    for (std::size_t reads = 0; reads < max_reads_per_wakeup && c.session.wants_input(); ++reads) {
      const std::span<std::byte> space = c.session.input_space(read_chunk);
      const ssize_t got = ::recv(c.fd.get(), space.data(), space.size(), 0);
      const int error = errno;
      c.session.received(got > 0 ? static_cast<std::size_t>(got) : 0);
      if (got == 0) {
        c.session.peer_closed();
        return false;
      }
      if (got < 0) {
        if (error == EINTR) continue;
        if (error == EAGAIN || error == EWOULDBLOCK) break;
        return false;
      }
    }
    return true;
  }

  // False when the connection is finished (closing and fully flushed, or broken).
  bool on_writable(Connection& c) {
    while (!c.session.unsent().empty()) {
      const std::span<const std::byte> unsent = c.session.unsent();
      const ssize_t sent = ::send(c.fd.get(), unsent.data(), unsent.size(), MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return false;
      }
      c.session.sent(static_cast<std::size_t>(sent));
    }
    if (c.session.closing() && c.session.unsent().empty()) return false;
    c.session.after_write();
    return true;
  }

  void close_connection(int fd) {
    const auto found = connections.find(fd);
    if (found == connections.end()) return;
    found->second->session.end();
    poller.remove(fd);
    admission.leave(found->second->session.peer().pid);
    connections.erase(found);
  }

  void tick() {
    std::uint64_t expirations = 0;
    (void)::read(timer.get(), &expirations, sizeof(expirations));
    const auto now = std::chrono::steady_clock::now();
    std::vector<int> expired;
    for (const auto& [fd, c] : connections) {
      if (c->session.expired(now)) expired.push_back(fd);
    }
    for (const int fd : expired) close_connection(fd);
    if (metrics_endpoint) metrics_endpoint->close_silent(now, config.hello_timeout);
    for (auto& [fd, c] : connections) c->session.log_activity();
    if (now - last_summary >= config.summary_interval && context.changes != changes_at_last_summary) {
      log_summary();
      last_summary = now;
      changes_at_last_summary = context.changes;
    }
  }

  void log_summary() const {
    for (const std::string& line : report::summary_lines(ledger.summary(), counters)) log(line);
  }

  [[nodiscard]] std::string exposition() const {
    return metrics::exposition(ledger.summary(), counters,
                               {.version = meshrt::runtime_version,
                                .protocol_version = protocol::version,
                                .start_time_seconds = start_time_seconds});
  }

  void dispatch(const epoll_event& event) {
    const int fd = event.data.fd;
    if (fd == listener.get()) {
      accept_all();
    } else if (fd == wake.get() || (signals.valid() && fd == signals.get())) {
      running = false;
    } else if (fd == timer.get()) {
      tick();
    } else if (metrics_endpoint && fd == metrics_endpoint->listener()) {
      metrics_endpoint->accept_all([this](int from) { return shed_connection(from); });
    } else if (metrics_endpoint && metrics_endpoint->serves(fd)) {
      metrics_endpoint->on_event(fd, event.events);
    } else if (const auto found = connections.find(fd); found != connections.end()) {
      Connection& c = *found->second;
      bool alive = true;
      if ((event.events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0U && !c.session.closing()) alive = on_readable(c);
      if (alive && (!c.session.unsent().empty() || c.session.closing())) alive = on_writable(c);
      if (alive) {
        update_interest(c);
      } else {
        close_connection(fd);
      }
    }
  }

  Result<void> loop() {
    std::array<epoll_event, 64> events{};
    while (running) {
      // A change not yet sampled (it came within min_interval of the last sample) is sampled
      // when the interval is up, even if nothing else happens.
      const bool unsampled = config.history_samples > 0 && context.changes != changes_at_last_sample;
      auto ready = poller.wait(events, unsampled ? static_cast<int>(History::min_interval.count()) : -1);
      if (!ready) return tl::unexpected(std::move(ready.error()));
      for (const epoll_event& event : *ready) dispatch(event);
      if (config.history_samples > 0) sample_history(std::chrono::steady_clock::now());
    }
    return {};
  }
};

Result<std::unique_ptr<Server>> Server::start(ServerConfig config) {
  // Every session is a descriptor: take all the kernel allows us, not the default soft limit.
  if (rlimit limit{}; ::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &limit);
  }
  std::optional<gid_t> group;
  if (config.group) {
    auto gid = unix_socket::group_id(*config.group);
    if (!gid) return tl::unexpected(std::move(gid.error()));
    group = *gid;
  }
  if (config.activity_interval <= 0ms || config.summary_interval <= 0ms) {
    return fail(ErrorCode::invalid_argument, "log intervals must be positive");
  }
  auto poller = Poller::create();
  if (!poller) return tl::unexpected(std::move(poller.error()));
  auto listener = unix_socket::listen(config.socket_path, group);
  if (!listener) return tl::unexpected(std::move(listener.error()));
  auto loop = std::make_unique<Loop>(std::move(config), group, std::move(*poller));
  loop->listener = std::move(*listener);
  loop->wake = FileDescriptor(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  loop->timer = FileDescriptor(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  // From here the socket file is ours: the Server's destructor removes it on every way out.
  std::unique_ptr<Server> server(new Server(std::move(loop)));
  Loop& s = *server->loop_;
  if (!s.wake.valid() || !s.timer.valid()) return io_failure("server setup", errno);
  const auto interval = std::chrono::duration_cast<std::chrono::nanoseconds>(s.config.activity_interval);
  itimerspec spec{};
  spec.it_interval.tv_sec = static_cast<time_t>(interval.count() / 1'000'000'000);
  spec.it_interval.tv_nsec = static_cast<long>(interval.count() % 1'000'000'000);
  spec.it_value = spec.it_interval;
  if (::timerfd_settime(s.timer.get(), 0, &spec, nullptr) != 0) return io_failure("timerfd_settime", errno);
  for (const int fd : {s.listener.get(), s.wake.get(), s.timer.get()}) {
    if (auto watched = s.poller.add(fd, EPOLLIN); !watched) return tl::unexpected(std::move(watched.error()));
  }
  if (const std::optional<std::string>& address = s.config.metrics_address; address.has_value()) {
    auto metrics = MetricsEndpoint::listen(*address, s.poller, [&s] { return s.exposition(); });
    if (!metrics) return tl::unexpected(std::move(metrics.error()));
    s.metrics_endpoint = std::move(*metrics);
  }
  return server;
}

Server::Server(std::unique_ptr<Loop> loop) : loop_(std::move(loop)) {}

Server::~Server() {
  // A server that never ran still owns its socket file.
  if (loop_ && loop_->listener.valid()) ::unlink(loop_->config.socket_path.c_str());
}

const std::string& Server::socket_path() const { return loop_->config.socket_path; }

std::optional<std::uint16_t> Server::metrics_port() const {
  if (!loop_->metrics_endpoint) return std::nullopt;
  return loop_->metrics_endpoint->port();
}

void Server::stop() {
  const std::uint64_t one = 1;
  (void)::write(loop_->wake.get(), &one, sizeof(one));
}

Result<void> Server::run(bool handle_signals) {
  Loop& s = *loop_;
  if (handle_signals) {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (::pthread_sigmask(SIG_BLOCK, &mask, nullptr) != 0) return io_failure("pthread_sigmask", errno);
    s.signals = FileDescriptor(::signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC));
    if (!s.signals.valid()) return io_failure("signalfd", errno);
    if (auto watched = s.poller.add(s.signals.get(), EPOLLIN); !watched) return watched;
  }
  s.log(fmt::format("meshrt-alloc-server: listening on {} (pid {}, protocol version {})", s.config.socket_path,
                    ::getpid(), protocol::version));
  if (s.metrics_endpoint) {
    s.log(fmt::format("meshrt-alloc-server: Prometheus metrics at http://{}:{}/metrics", s.metrics_endpoint->host(),
                      s.metrics_endpoint->port()));
  }
  auto result = s.loop();
  // Stop accepting first: a client must not connect to a server that is going away.
  s.poller.remove(s.listener.get());
  s.listener.reset();
  ::unlink(s.config.socket_path.c_str());
  // Sessions still connected keep their buffers in the final figures.
  for (auto& [fd, connection] : s.connections) connection->session.log_activity();
  s.log("meshrt-alloc-server: stopping");
  s.log_summary();
  return result;
}

}  // namespace meshrt::server
