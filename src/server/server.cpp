module;
#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include <fcntl.h>
#include <arpa/inet.h>
#include <grp.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;
import :report;
import :metrics;

namespace meshrt::server {

namespace {

using namespace std::chrono_literals;

std::string describe_errno(int error) { return std::system_category().message(error); }

tl::unexpected<Error> io_failure(std::string_view what, int error) {
  return fail(ErrorCode::io_error, fmt::format("{}: {}", what, describe_errno(error)));
}

// Owns one file descriptor.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }
  [[nodiscard]] int get() const { return fd_; }
  [[nodiscard]] bool valid() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_{-1};
};

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Field 22 of /proc/PID/stat: the start time in clock ticks since boot. With the pid it names a
// process uniquely: a reused pid has a later start time.
std::uint64_t process_start_time(std::uint32_t pid) {
  std::ifstream file(fmt::format("/proc/{}/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto close_paren = stat.rfind(')');
  if (close_paren == std::string::npos) return 0;
  std::istringstream fields(stat.substr(close_paren + 2));
  std::string field;
  // After "pid (comm) " the state is field 3; the start time is field 22.
  for (int index = 3; index <= 22 && fields >> field; ++index) {
    if (index == 22) return std::stoull(field);
  }
  return 0;
}

// Names reach JSON, Prometheus labels and SVG: keep them valid UTF-8 without control characters,
// whatever a client sent or /proc cut (comm is cut at 15 bytes, maybe inside a character).
std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    std::size_t length = 0;
    if (byte < 0x80) {
      length = 1;
    } else if ((byte & 0xE0U) == 0xC0U && byte >= 0xC2U) {
      length = 2;
    } else if ((byte & 0xF0U) == 0xE0U) {
      length = 3;
    } else if ((byte & 0xF8U) == 0xF0U && byte <= 0xF4U) {
      length = 4;
    }
    bool valid = length > 0 && i + length <= text.size();
    for (std::size_t k = 1; valid && k < length; ++k) valid = (static_cast<unsigned char>(text[i + k]) & 0xC0U) == 0x80U;
    if (valid && length > 2) {  // no overlong forms, surrogates or code points past U+10FFFF
      const auto second = static_cast<unsigned char>(text[i + 1]);
      valid = !(byte == 0xE0U && second < 0xA0U) && !(byte == 0xEDU && second > 0x9FU) &&
              !(byte == 0xF0U && second < 0x90U) && !(byte == 0xF4U && second > 0x8FU);
    }
    if (!valid) {
      out += '?';
      ++i;
      continue;
    }
    if (length == 1 && (byte < 0x20 || byte == 0x7F)) {
      out += '?';
    } else {
      out.append(text.substr(i, length));
    }
    i += length;
  }
  return out;
}

std::string process_name(std::uint32_t pid) {
  std::ifstream file(fmt::format("/proc/{}/comm", pid));
  std::string name;
  std::getline(file, name);
  return printable(name);
}

Result<gid_t> group_id(const std::string& name) {
  std::array<char, 16384> buffer{};
  group entry{};
  group* found = nullptr;
  const int error = ::getgrnam_r(name.c_str(), &entry, buffer.data(), buffer.size(), &found);
  if (error != 0 || found == nullptr) {
    return fail(ErrorCode::not_found, fmt::format("unknown group '{}': give --group an existing group", name));
  }
  return found->gr_gid;
}

Result<sockaddr_un> socket_address(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path)) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("socket path '{}' must be 1 to {} bytes long", path, sizeof(address.sun_path) - 1));
  }
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  return address;
}

// The socket's directory: created 0700 (0750 for a group) when missing; when present it must
// belong to us or to root, so nobody else can swap the socket under our clients.
Result<void> prepare_directory(const std::string& socket_path, std::optional<gid_t> gid) {
  const auto slash = socket_path.rfind('/');
  const std::string directory = slash == std::string::npos ? "." : socket_path.substr(0, std::max<std::size_t>(slash, 1));
  struct stat info {};
  if (::stat(directory.c_str(), &info) != 0) {
    if (errno != ENOENT) return io_failure(fmt::format("cannot inspect {}", directory), errno);
    const mode_t mode = gid ? 0750 : 0700;
    // Parents first (like mkdir -p); only the last level gets our mode and group.
    for (std::size_t at = directory.find('/', 1); at != std::string::npos; at = directory.find('/', at + 1)) {
      const std::string parent = directory.substr(0, at);
      if (::mkdir(parent.c_str(), 0755) != 0 && errno != EEXIST) {
        return io_failure(fmt::format("cannot create {}", parent), errno);
      }
    }
    if (::mkdir(directory.c_str(), mode) != 0 && errno != EEXIST) {
      return io_failure(fmt::format("cannot create {}", directory), errno);
    }
    if (::chmod(directory.c_str(), mode) != 0) return io_failure(fmt::format("cannot chmod {}", directory), errno);
    if (gid && ::chown(directory.c_str(), static_cast<uid_t>(-1), *gid) != 0) {
      return io_failure(fmt::format("cannot give {} to the group", directory), errno);
    }
    return {};
  }
  if (!S_ISDIR(info.st_mode)) return fail(ErrorCode::invalid_argument, fmt::format("{} is not a directory", directory));
  if (info.st_uid != ::getuid() && info.st_uid != 0) {
    return fail(ErrorCode::permission_denied,
                fmt::format("{} belongs to uid {}, not to you (uid {}): choose another --socket", directory,
                            info.st_uid, ::getuid()));
  }
  return {};
}

// A socket file left by a server that died is replaced; a live server is never displaced.
Result<void> clear_stale_socket(const std::string& path, const sockaddr_un& address) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) return {};
  if (!S_ISSOCK(info.st_mode)) {
    return fail(ErrorCode::invalid_argument, fmt::format("{} exists and is not a socket: remove it or choose another "
                                                         "--socket",
                                                         path));
  }
  const FileDescriptor probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe.valid()) return io_failure("socket", errno);
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("another allocation server is already listening on {}", path));
  }
  if (::unlink(path.c_str()) != 0) return io_failure(fmt::format("cannot remove the stale socket {}", path), errno);
  return {};
}

Result<FileDescriptor> listen_on(const std::string& path, std::optional<gid_t> gid) {
  auto address = socket_address(path);
  if (!address) return tl::unexpected(std::move(address.error()));
  if (auto ready = prepare_directory(path, gid); !ready) return tl::unexpected(std::move(ready.error()));
  if (auto cleared = clear_stale_socket(path, *address); !cleared) return tl::unexpected(std::move(cleared.error()));
  FileDescriptor listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listener.valid()) return io_failure("socket", errno);
  const mode_t mode = gid ? 0660 : 0600;
  // The umask makes the socket private from the moment it exists; chmod then sets it exactly.
  const mode_t old_umask = ::umask(0177);
  const int bound = ::bind(listener.get(), reinterpret_cast<const sockaddr*>(&*address), sizeof(*address));
  const int bind_error = errno;
  ::umask(old_umask);
  if (bound != 0) return io_failure(fmt::format("cannot bind {}", path), bind_error);
  if (::chmod(path.c_str(), mode) != 0) return io_failure(fmt::format("cannot chmod {}", path), errno);
  if (gid && ::chown(path.c_str(), static_cast<uid_t>(-1), *gid) != 0) {
    return io_failure(fmt::format("cannot give {} to the group", path), errno);
  }
  if (::listen(listener.get(), SOMAXCONN) != 0) return io_failure("listen", errno);
  return listener;
}

struct Activity {
  std::uint64_t allocated{};
  std::uint64_t allocated_bytes{};
  std::uint64_t freed{};
  std::uint64_t freed_bytes{};
};

constexpr std::size_t read_chunk = std::size_t{256} << 10U;
constexpr std::size_t max_reads_per_wakeup = 16;  // fairness between clients
constexpr int unknown_frees_logged_per_session = 5;

}  // namespace

struct Connection {
  FileDescriptor fd;
  ucred peer{};
  std::chrono::steady_clock::time_point accepted{std::chrono::steady_clock::now()};
  // Token bucket for the message rate: refilled at the limit per second, at most one second's worth.
  double message_tokens{0};
  std::chrono::steady_clock::time_point tokens_at{std::chrono::steady_clock::now()};
  std::uint64_t start_time{};
  std::string name;
  bool greeted{false};
  protocol::ClientRole role{protocol::ClientRole::tracker};
  SessionId session{};  // 0 until a tracker says Hello (the ledger's ids start at 1)
  bool in_snapshot{false};
  std::uint64_t snapshot_records{};
  bool said_goodbye{false};
  bool gave_up{false};  // its Goodbye said events were left undelivered (the server was too slow)
  bool closing{false};  // flush the output, then close
  std::vector<std::byte> input;
  std::size_t input_start{};
  std::vector<std::byte> output;
  std::size_t output_start{};
  // A buffer list still going out, a page whenever the output runs low; frames that arrive
  // meanwhile wait in `input` until it is done, so replies stay in the order asked.
  std::unique_ptr<BufferListing> listing;
  std::int64_t listing_now_ns{};
  std::chrono::steady_clock::time_point listing_progress;
  std::map<std::uint32_t, Activity> activity;
  int unknown_frees_logged{};
};

// A scraper's connection to /metrics: one request, one response, then close.
struct HttpConnection {
  FileDescriptor fd;
  std::chrono::steady_clock::time_point accepted{std::chrono::steady_clock::now()};
  std::string input;
  std::string output;
  std::size_t output_start{};
};

constexpr std::size_t max_http_connections = 64;

Result<FileDescriptor> listen_tcp(const std::string& text) {
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
  if (!fd.valid()) return io_failure("socket", errno);
  const int one = 1;
  (void)::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&in), sizeof(in)) != 0) {
    return fail(ErrorCode::io_error, fmt::format("cannot serve metrics on {}: {}", text, describe_errno(errno)));
  }
  if (::listen(fd.get(), 64) != 0) return io_failure("listen", errno);
  return fd;
}

struct Server::State {
  ServerConfig config;
  std::optional<gid_t> gid;
  FileDescriptor listener;
  FileDescriptor epoll;
  FileDescriptor wake;
  FileDescriptor timer;
  FileDescriptor signals;
  FileDescriptor metrics_listener;
  std::uint16_t metrics_port{};
  std::string metrics_host;
  std::map<int, std::unique_ptr<HttpConnection>> http;
  std::int64_t start_time_seconds{now_ns() / 1'000'000'000};
  Ledger ledger;
  ConnectionCounters counters;
  std::map<int, std::unique_ptr<Connection>> connections;
  std::chrono::steady_clock::time_point started{std::chrono::steady_clock::now()};
  std::chrono::steady_clock::time_point last_summary{started};
  std::uint64_t changes{};
  std::uint64_t changes_at_last_summary{};
  bool running{true};

  void log(std::string_view line) const {
    if (config.log) {
      config.log(line);
      return;
    }
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }

  [[nodiscard]] std::string who(const Connection& c) const { return fmt::format("pid {} ({})", c.peer.pid, c.name); }

  Result<void> watch(int fd, std::uint32_t events, int op = EPOLL_CTL_ADD) const {
    epoll_event event{};
    event.events = events;
    event.data.fd = fd;
    if (::epoll_ctl(epoll.get(), op, fd, &event) != 0) return io_failure("epoll_ctl", errno);
    return {};
  }

  void update_interest(Connection& c) const {
    // While a buffer list goes out, what the peer sends next waits in its socket (read after).
    std::uint32_t events = c.closing || c.listing ? 0U : static_cast<std::uint32_t>(EPOLLIN);
    if (c.output.size() > c.output_start) events |= EPOLLOUT;
    if (auto watched = watch(c.fd.get(), events, EPOLL_CTL_MOD); !watched) log(watched.error().message);
  }

  // When the process runs out of descriptors, the waiting connection is accepted and closed with
  // this spare one, so the listener does not stay readable forever (a busy loop).
  FileDescriptor spare{::open("/dev/null", O_RDONLY | O_CLOEXEC)};
  std::uint64_t descriptor_shortages{};

  // False when even the spare is gone (it could not be reopened last time): then the caller stops
  // accepting until the next wake-up instead of retrying in a loop.
  bool shed_one_connection(int from) {
    ++descriptor_shortages;
    ++counters.rejected_sessions;
    if (descriptor_shortages == 1 || descriptor_shortages % 1000 == 0) {
      log(fmt::format("out of file descriptors: refusing connections ({} so far)", descriptor_shortages));
    }
    if (!spare.valid()) spare = FileDescriptor(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (!spare.valid()) return false;
    spare.reset();
    {
      const FileDescriptor refused(::accept4(from, nullptr, nullptr, SOCK_CLOEXEC));
    }  // closed here, before the spare is taken back
    spare = FileDescriptor(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    return true;
  }

  std::map<pid_t, std::size_t> per_process;  // open connections by peer pid

  // Refuses a connection at the door: one Error frame, written without waiting, then closed. It
  // never takes a slot, so a flood of refusals cannot crowd out other clients.
  void refuse(FileDescriptor fd, const ucred& peer, const std::string& name, ErrorCode code,
              const std::string& message) {
    ++counters.rejected_sessions;
    if (counters.rejected_sessions <= 5 || counters.rejected_sessions % 1000 == 0) {
      log(fmt::format("pid {} ({}): refused: {} ({} refused so far)", peer.pid, name, message,
                      counters.rejected_sessions));
    }
    std::vector<std::byte> bytes;
    protocol::encode(protocol::ErrorMessage{code, message}, bytes);
    (void)::send(fd.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  }

  void accept_all() {
    for (;;) {
      FileDescriptor fd(::accept4(listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!fd.valid()) {
        if ((errno == EMFILE || errno == ENFILE) && shed_one_connection(listener.get())) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) log(fmt::format("accept: {}", describe_errno(errno)));
        return;
      }
      ucred peer{};
      socklen_t length = sizeof(peer);
      if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0) {
        log(fmt::format("SO_PEERCRED: {}", describe_errno(errno)));
        continue;
      }
      const auto pid = static_cast<std::uint32_t>(peer.pid);
      const std::string name = process_name(pid);
      if (peer.uid != ::getuid() && peer.uid != 0 && !gid) {
        refuse(std::move(fd), peer, name, ErrorCode::permission_denied,
               fmt::format("uid {} may not use this server (it serves uid {}; start it with --group)", peer.uid,
                           ::getuid()));
        continue;
      }
      if (connections.size() >= config.max_sessions) {
        refuse(std::move(fd), peer, name, ErrorCode::limit_exceeded,
               fmt::format("the server already has {} sessions, its limit (raise it with --max-sessions)", config.max_sessions));
        continue;
      }
      if (per_process[peer.pid] >= config.max_sessions_per_process) {
        refuse(std::move(fd), peer, name, ErrorCode::limit_exceeded,
               fmt::format("pid {} already has {} connections, the limit for one process (raise it with --max-sessions-per-process)", peer.pid,
                           config.max_sessions_per_process));
        continue;
      }
      auto connection = std::make_unique<Connection>();
      connection->peer = peer;
      connection->start_time = process_start_time(pid);
      connection->name = name;
      connection->fd = std::move(fd);
      connection->message_tokens = static_cast<double>(config.max_messages_per_second);
      const int key = connection->fd.get();
      if (!watch(key, EPOLLIN)) continue;
      ++per_process[peer.pid];
      connections.emplace(key, std::move(connection));
    }
  }

  // False when the session sends faster than max_messages_per_second (it is closed).
  bool within_rate(Connection& c) {
    const auto now = std::chrono::steady_clock::now();
    const double limit = static_cast<double>(config.max_messages_per_second);
    c.message_tokens = std::min(limit, c.message_tokens + limit * std::chrono::duration<double>(now - c.tokens_at).count());
    c.tokens_at = now;
    if (c.message_tokens >= 1) {
      c.message_tokens -= 1;
      return true;
    }
    reject(c, ErrorCode::limit_exceeded,
           fmt::format("more than {} messages a second from one session, the server's limit (raise it with --max-messages-per-second)",
                       config.max_messages_per_second),
           counters.rejected_sessions);
    return false;
  }

  // Tells the client why, then closes its session once the message is out.
  void reject(Connection& c, ErrorCode code, const std::string& message, std::uint64_t& counter) {
    ++counter;
    log(fmt::format("{}: session closed: {}", who(c), message));
    protocol::encode(protocol::ErrorMessage{code, message}, c.output);
    c.closing = true;
    update_interest(c);
  }

  void send(Connection& c, const std::string& json) {
    // Replies are split into chunks under the frame limit; the client joins them.
    constexpr std::size_t chunk = protocol::max_payload_size - 16;
    std::size_t offset = 0;
    do {
      const std::size_t size = std::min(chunk, json.size() - offset);
      protocol::encode(protocol::Reply{offset + size == json.size(), json.substr(offset, size)}, c.output);
      offset += size;
    } while (offset < json.size());
    if (c.output.size() - c.output_start > config.max_pending_output) {
      ++counters.dropped_slow_readers;
      log(fmt::format("{}: dropped: it stopped reading its replies ({} bytes pending)", who(c),
                      c.output.size() - c.output_start));
      c.output.clear();
      c.output_start = 0;
      c.closing = true;
    }
    update_interest(c);
  }

  // Pages of a buffer list, while the peer keeps less than a window of it unread: memory stays
  // bounded by the window, and each step of the event loop renders at most one frame per peer.
  void continue_listing(Connection& c) {
    constexpr std::size_t window = std::size_t{1} << 20U;
    constexpr std::size_t page = protocol::max_payload_size - 16;
    static_assert(page >= BufferListing::max_entry_bytes);
    std::string text;
    while (c.listing && !c.closing && c.output.size() - c.output_start < window) {
      text.clear();
      c.listing->render(text, page, c.listing_now_ns);
      protocol::encode(protocol::Reply{c.listing->done(), text}, c.output);
      c.listing_progress = std::chrono::steady_clock::now();
      if (c.listing->done()) c.listing.reset();
    }
    update_interest(c);
  }

  [[nodiscard]] ServerInfo info() const {
    return ServerInfo{static_cast<std::uint32_t>(::getpid()), config.socket_path,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(), now_ns()};
  }

  void answer(Connection& c, const protocol::Query& query) {
    switch (query.kind) {
      case protocol::QueryKind::summary:
        send(c, report::summary_json(ledger.summary(), counters, info()));
        return;
      case protocol::QueryKind::buffers:
        c.listing = std::make_unique<BufferListing>(ledger.list_buffers(query.pid));
        c.listing_now_ns = now_ns();
        continue_listing(c);
        return;
      case protocol::QueryKind::verify:
        send(c, report::verification_json(ledger.verify()));
        return;
    }
  }

  // Applies one frame; an Error closes the session (counted as malformed or rejected).
  void handle(Connection& c, const protocol::Frame& frame) {
    if (!within_rate(c)) return;
    auto decoded = protocol::decode(frame);
    if (!decoded) {
      reject(c, decoded.error().code, decoded.error().message, counters.malformed_messages);
      return;
    }
    const auto out_of_order = [&](std::string_view why) {
      reject(c, ErrorCode::protocol_error,
             fmt::format("{} message out of order: {}", protocol::to_string(frame.type), why),
             counters.malformed_messages);
    };
    if (c.said_goodbye) return out_of_order("the session already said Goodbye");
    if (!c.greeted && frame.type != protocol::MessageType::hello) return out_of_order("the first message must be Hello");
    const bool tracker = c.role == protocol::ClientRole::tracker;
    const bool tracker_message = frame.type != protocol::MessageType::hello &&
                                 frame.type != protocol::MessageType::query &&
                                 frame.type != protocol::MessageType::goodbye;
    if (c.greeted && tracker_message && !tracker) return out_of_order("a monitor may only query");
    const bool snapshot_part = frame.type == protocol::MessageType::snapshot_chunk ||
                               frame.type == protocol::MessageType::snapshot_end;
    if (c.in_snapshot != snapshot_part && tracker_message) {
      return out_of_order(c.in_snapshot ? "a snapshot is in progress" : "no snapshot was begun");
    }
    ++changes;
    std::visit([&](const auto& message) { apply(c, message); }, *decoded);
  }

  void apply(Connection& c, const protocol::Hello& hello) {
    if (c.greeted) {
      reject(c, ErrorCode::protocol_error, "Hello message out of order: the session already said Hello",
             counters.malformed_messages);
      return;
    }
    if (hello.protocol_version != protocol::version) {
      reject(c, ErrorCode::protocol_error,
             fmt::format("protocol version {} is not supported: this server speaks version {}", hello.protocol_version,
                         protocol::version),
             counters.rejected_sessions);
      return;
    }
    if (hello.claimed_pid != 0 && hello.claimed_pid != static_cast<std::uint32_t>(c.peer.pid)) {
      reject(c, ErrorCode::permission_denied,
             fmt::format("the client claims pid {} but the kernel says it is pid {}: identity comes from the kernel",
                         hello.claimed_pid, c.peer.pid),
             counters.rejected_sessions);
      return;
    }
    c.greeted = true;
    c.role = hello.role;
    if (c.name.empty()) c.name = hello.process_name;
    if (c.role == protocol::ClientRole::monitor) {
      ++counters.monitors;
      return;
    }
    ++counters.sessions_opened;
    c.session = ledger.open_session(SessionIdentity{static_cast<std::uint32_t>(c.peer.pid), c.peer.uid,
                                                    c.start_time, c.name});
    log(fmt::format("{}: connected (uid {}, session {})", who(c), c.peer.uid, c.session));
  }

  void apply(Connection& c, const protocol::DeviceInfo& info) {
    for (const protocol::DeviceTotals& device : info.devices) ledger.set_device_totals(c.session, device);
  }

  void apply(Connection& c, const protocol::MeshBufferName& name) {
    if (ledger.names(c.session) >= config.max_names_per_session) {
      reject(c, ErrorCode::limit_exceeded,
             fmt::format("more than {} mesh buffer names in one process, the server's limit (raise it with --max-names-per-process)",
                         config.max_names_per_session),
             counters.rejected_sessions);
      return;
    }
    ledger.name_mesh_buffer(c.session, name.mesh_buffer, printable(name.name));
  }

  bool within_limit(Connection& c, std::size_t adding) {
    if (ledger.live_allocations(c.session) + adding <= config.max_live_per_session) return true;
    reject(c, ErrorCode::limit_exceeded,
           fmt::format("more than {} live allocations in one process, the server's limit (raise it with --max-live-per-process)", config.max_live_per_session),
           counters.rejected_sessions);
    return false;
  }

  void sequence(Connection& c, std::uint64_t first, std::uint64_t count) {
    if (!ledger.check_sequence(c.session, first, count)) {
      log(fmt::format("{}: sequence gap: batch starts at event {}, not where the last ended; events were lost",
                      who(c), first));
    }
  }

  void apply(Connection& c, const protocol::EventBatch& batch) {
    std::uint64_t allocating = 0;
    for (std::size_t i = 0; i < batch.records.size(); ++i) {
      const protocol::EventRecord record = batch.records[i];
      if (!record.is_free) allocating += record.alloc.device_count;
    }
    if (!within_limit(c, allocating)) return;
    sequence(c, batch.first_sequence, batch.records.size());
    for (std::size_t i = 0; i < batch.records.size() && !c.closing; ++i) {
      const protocol::EventRecord record = batch.records[i];
      if (record.is_free) {
        free(c, record.free);
      } else {
        allocate(c, record.alloc);
      }
    }
  }

  // No real client comes near 2^64 bytes in use: a record that would pass it is malformed.
  void refuse_wrapping(Connection& c, const protocol::AllocRecord& record) {
    reject(c, ErrorCode::protocol_error,
           fmt::format("malformed allocation: {} buffers of {} bytes from buffer {} would take a total past 2^64 bytes",
                       record.device_count, record.size, record.buffer),
           counters.malformed_messages);
  }

  void allocate(Connection& c, const protocol::AllocRecord& record) {
    if (!ledger.apply_alloc(c.session, record)) return refuse_wrapping(c, record);
    if (!config.log_activity) return;
    for (std::uint32_t device = record.device; device < record.device + record.device_count; ++device) {
      Activity& a = c.activity[device];
      ++a.allocated;
      a.allocated_bytes += record.size;
    }
  }

  void free(Connection& c, const protocol::FreeRecord& record) {
    const FreeOutcome outcome = ledger.apply_free(c.session, record);
    if (config.log_activity) {
      for (std::uint64_t mask = outcome.freed_mask; mask != 0; mask &= mask - 1) {
        Activity& a = c.activity[outcome.first_device + static_cast<std::uint32_t>(std::countr_zero(mask))];
        ++a.freed;
        a.freed_bytes += outcome.size;
      }
    }
    if (outcome.unknown_frees + outcome.double_frees == 0) return;
    if (c.unknown_frees_logged++ < unknown_frees_logged_per_session) {
      log(fmt::format("{}: {} for buffer {}{}", who(c),
                      outcome.double_frees > 0 ? "Double deallocation" : "Deallocation for unknown buffer",
                      record.buffer,
                      c.unknown_frees_logged == unknown_frees_logged_per_session ? " (further ones are counted, not "
                                                                                   "logged)" :
                                                                                   ""));
    }
  }

  void apply(Connection& c, const protocol::SnapshotBegin& /*begin*/) {
    ledger.begin_snapshot(c.session);
    c.in_snapshot = true;
    c.snapshot_records = 0;
  }

  void apply(Connection& c, const protocol::SnapshotChunk& chunk) {
    std::uint64_t buffers = 0;
    for (std::size_t i = 0; i < chunk.records.size(); ++i) buffers += chunk.records[i].alloc.device_count;
    if (!within_limit(c, buffers)) return;
    for (std::size_t i = 0; i < chunk.records.size(); ++i) {
      if (!ledger.apply_snapshot_record(c.session, chunk.records[i].alloc)) return refuse_wrapping(c, chunk.records[i].alloc);
    }
    c.snapshot_records += chunk.records.size();
  }

  void apply(Connection& c, const protocol::SnapshotEnd& end) {
    if (end.record_count != c.snapshot_records) {
      reject(c, ErrorCode::protocol_error,
             fmt::format("malformed SnapshotEnd frame: says {} records, the chunks carried {}", end.record_count,
                         c.snapshot_records),
             counters.malformed_messages);
      return;
    }
    ledger.end_snapshot(c.session, end.next_sequence);
    c.in_snapshot = false;
    if (c.snapshot_records > 0) log(fmt::format("{}: resynchronised: {} live buffers", who(c), c.snapshot_records));
  }

  void apply(Connection& c, const protocol::Goodbye& goodbye) {
    c.said_goodbye = true;
    c.gave_up = !goodbye.complete;
  }

  void apply(Connection& c, const protocol::Query& query) { answer(c, query); }

  void apply(Connection& c, const protocol::Reply& /*reply*/) {
    reject(c, ErrorCode::protocol_error, "Reply message out of order: only the server sends replies",
           counters.malformed_messages);
  }

  void apply(Connection& c, const protocol::ErrorMessage& /*error*/) {
    reject(c, ErrorCode::protocol_error, "Error message out of order: only the server sends errors",
           counters.malformed_messages);
  }

  // Handles every whole frame received, in order, until the session closes or a list starts.
  void handle_frames(Connection& c) {
    while (!c.closing && !c.listing) {
      const auto pending = std::span<const std::byte>(c.input).subspan(c.input_start);
      auto next = protocol::next_frame(pending, config.max_payload);
      if (!next) {
        reject(c, next.error().code, next.error().message, counters.malformed_messages);
        break;
      }
      const std::optional<protocol::Frame>& frame = *next;
      if (!frame) break;  // a partial frame: wait for more bytes
      handle(c, *frame);
      c.input_start += frame->frame_size;
    }
    if (c.input_start == c.input.size()) {
      c.input.clear();
      c.input_start = 0;
    } else if (c.input_start > read_chunk) {
      c.input.erase(c.input.begin(), c.input.begin() + static_cast<std::ptrdiff_t>(c.input_start));
      c.input_start = 0;
    }
  }

  // Reads what is there (a bounded amount, for fairness), applies every complete frame.
  // Returns false when the connection is finished.
  bool on_readable(Connection& c) {
    for (std::size_t reads = 0; reads < max_reads_per_wakeup && !c.closing && !c.listing; ++reads) {
      const std::size_t old_size = c.input.size();
      c.input.resize(old_size + read_chunk);
      const ssize_t got = ::recv(c.fd.get(), c.input.data() + old_size, read_chunk, 0);
      c.input.resize(old_size + static_cast<std::size_t>(std::max<ssize_t>(got, 0)));
      if (got == 0) {
        // An orderly close; in the middle of a frame, it is a truncated message.
        // Not malformed: a process killed in the middle of a send leaves exactly this.
        if (c.input.size() > c.input_start) {
          ++counters.truncated_sessions;
          log(fmt::format("{}: closed the connection in the middle of a frame ({} bytes of it)", who(c),
                          c.input.size() - c.input_start));
        }
        return false;
      }
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return false;
      }
      handle_frames(c);
    }
    return true;
  }

  // Returns false when the connection is finished (closing and fully flushed, or broken).
  bool on_writable(Connection& c) {
    while (c.output.size() > c.output_start) {
      const ssize_t sent = ::send(c.fd.get(), c.output.data() + c.output_start, c.output.size() - c.output_start,
                                  MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return false;
      }
      c.output_start += static_cast<std::size_t>(sent);
    }
    if (c.output.size() == c.output_start) {
      c.output.clear();
      c.output_start = 0;
      if (c.closing) return false;
    }
    if (c.listing) {
      continue_listing(c);
      if (!c.listing) handle_frames(c);  // what waited behind the list
    }
    update_interest(c);
    return true;
  }

  // "Allocated N buffers on Device D": devices with the same figures share one line, so a
  // replicated buffer on 64 devices logs one line, not 64.
  void log_activity(Connection& c) {
    const auto emit = [&](std::string_view verb, auto count_of, auto bytes_of) {
      auto it = c.activity.begin();
      while (it != c.activity.end()) {
        const std::uint64_t count = count_of(it->second);
        const std::uint64_t bytes = bytes_of(it->second);
        auto last = it;
        auto next = std::next(it);
        while (next != c.activity.end() && next->first == last->first + 1 && count_of(next->second) == count &&
               bytes_of(next->second) == bytes) {
          last = next++;
        }
        if (count > 0) {
          if (last == it) {
            log(fmt::format("{}: {} {} buffers on Device {} ({} bytes)", who(c), verb, count, it->first, bytes));
          } else {
            log(fmt::format("{}: {} {} buffers on Devices {}-{} ({} bytes on each)", who(c), verb, count, it->first,
                            last->first, bytes));
          }
        }
        it = next;
      }
    };
    emit("Allocated", [](const Activity& a) { return a.allocated; }, [](const Activity& a) { return a.allocated_bytes; });
    emit("Freed", [](const Activity& a) { return a.freed; }, [](const Activity& a) { return a.freed_bytes; });
    c.activity.clear();
  }

  void close_connection(int fd) {
    const auto found = connections.find(fd);
    if (found == connections.end()) return;
    Connection& c = *found->second;
    if (config.log_activity) log_activity(c);
    if (c.session != 0) {
      const SessionEnd how = !c.said_goodbye ? SessionEnd::disconnected
                             : c.gave_up     ? SessionEnd::gave_up
                                             : SessionEnd::goodbye;
      const Reclaim reclaim = ledger.close_session(c.session, how);
      ++changes;
      if (reclaim.buffers == 0) {
        log(fmt::format("{}: {}", who(c), how == SessionEnd::disconnected ? "disconnected" : "said goodbye"));
      } else if (how == SessionEnd::gave_up) {
        log(fmt::format("{}: exited before the server took all its events (it gave up on a slow server): {} buffers "
                        "({} bytes) lost at exit, not leaked: {}",
                        who(c), reclaim.buffers, reclaim.bytes, report::reclaim_text(reclaim)));
      } else if (how == SessionEnd::goodbye) {
        log(fmt::format("{}: exited with {} live buffers ({} bytes), leaked: {}", who(c), reclaim.buffers,
                        reclaim.bytes, report::reclaim_text(reclaim)));
      } else {
        log(fmt::format("{}: disconnected without Goodbye (crashed?): reclaimed {} leaked buffers ({} bytes): {}",
                        who(c), reclaim.buffers, reclaim.bytes, report::reclaim_text(reclaim)));
      }
    }
    (void)::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, fd, nullptr);
    if (const auto count = per_process.find(c.peer.pid); count != per_process.end() && --count->second == 0) {
      per_process.erase(count);
    }
    connections.erase(found);
  }

  // Connections that never said Hello are closed: they would hold a slot for nothing.
  void close_silent_connections() {
    const auto now = std::chrono::steady_clock::now();
    std::vector<int> silent;
    for (const auto& [fd, c] : connections) {
      if (!c->greeted && !c->closing && now - c->accepted > config.hello_timeout) silent.push_back(fd);
    }
    for (const int fd : silent) {
      ++counters.timed_out_sessions;
      Connection& c = *connections.at(fd);
      log(fmt::format("{}: said nothing for {} ms: closed", who(c), config.hello_timeout.count()));
      close_connection(fd);
    }
  }

  // A monitor that stopped reading in the middle of a buffer list would hold its copy forever.
  void drop_stalled_listings() {
    const auto now = std::chrono::steady_clock::now();
    std::vector<int> stalled;
    for (const auto& [fd, c] : connections) {
      if (c->listing && now - c->listing_progress > config.reply_stall_timeout) stalled.push_back(fd);
    }
    for (const int fd : stalled) {
      ++counters.dropped_slow_readers;
      Connection& c = *connections.at(fd);
      log(fmt::format("{}: dropped: it stopped reading its buffer list ({} of {} buffers sent) for {} ms", who(c),
                      c.listing->sent(), c.listing->size(), config.reply_stall_timeout.count()));
      close_connection(fd);
    }
  }

  void tick() {
    std::uint64_t expirations = 0;
    (void)::read(timer.get(), &expirations, sizeof(expirations));
    close_silent_connections();
    drop_stalled_listings();
    close_silent_http();
    if (config.log_activity) {
      for (auto& [fd, connection] : connections) log_activity(*connection);
    }
    const auto now = std::chrono::steady_clock::now();
    if (now - last_summary >= config.summary_interval && changes != changes_at_last_summary) {
      log_summary();
      last_summary = now;
      changes_at_last_summary = changes;
    }
  }

  void log_summary() const {
    for (const std::string& line : report::summary_lines(ledger.summary(), counters)) log(line);
  }

  // ---- /metrics over HTTP ----

  void accept_http() {
    for (;;) {
      FileDescriptor fd(::accept4(metrics_listener.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!fd.valid()) {
        if ((errno == EMFILE || errno == ENFILE) && shed_one_connection(metrics_listener.get())) continue;
        return;
      }
      if (http.size() >= max_http_connections) continue;  // closed at once: scrapers retry
      const int key = fd.get();
      if (!watch(key, EPOLLIN)) continue;
      auto connection = std::make_unique<HttpConnection>();
      connection->fd = std::move(fd);
      http.emplace(key, std::move(connection));
    }
  }

  // False when the connection is done (answered, or broken).
  bool on_http(HttpConnection& h, std::uint32_t events) {
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
              : metrics::respond(std::string_view(h.input).substr(0, head_end), [&] {
                  return metrics::exposition(ledger.summary(), counters,
                                             {.version = meshrt::runtime_version,
                                              .protocol_version = protocol::version,
                                              .start_time_seconds = start_time_seconds});
                });
      h.output = metrics::serialize(response);
      if (!watch(h.fd.get(), EPOLLOUT, EPOLL_CTL_MOD)) return false;
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

  void close_http(int fd) {
    (void)::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, fd, nullptr);
    http.erase(fd);
  }

  // Scrapers that never finish their request are closed like silent sessions.
  void close_silent_http() {
    const auto now = std::chrono::steady_clock::now();
    std::vector<int> silent;
    for (const auto& [fd, h] : http) {
      if (now - h->accepted > config.hello_timeout) silent.push_back(fd);
    }
    for (const int fd : silent) close_http(fd);
  }

  Result<void> loop() {
    std::array<epoll_event, 64> events{};
    while (running) {
      const int ready = ::epoll_wait(epoll.get(), events.data(), static_cast<int>(events.size()), -1);
      if (ready < 0) {
        if (errno == EINTR) continue;
        return io_failure("epoll_wait", errno);
      }
      for (const epoll_event& event : std::span(events).first(static_cast<std::size_t>(ready))) {
        const int fd = event.data.fd;
        if (fd == listener.get()) {
          accept_all();
        } else if (fd == wake.get() || (signals.valid() && fd == signals.get())) {
          running = false;
        } else if (fd == timer.get()) {
          tick();
        } else if (metrics_listener.valid() && fd == metrics_listener.get()) {
          accept_http();
        } else if (const auto scraper = http.find(fd); scraper != http.end()) {
          if (!on_http(*scraper->second, event.events)) close_http(fd);
        } else if (const auto found = connections.find(fd); found != connections.end()) {
          Connection& c = *found->second;
          bool alive = true;
          if ((event.events & (EPOLLIN | EPOLLHUP | EPOLLERR)) != 0U && !c.closing) alive = on_readable(c);
          if (alive && (c.output.size() > c.output_start || c.closing)) alive = on_writable(c);
          if (!alive) close_connection(fd);
        }
      }
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
  auto state = std::make_unique<State>();
  if (config.group) {
    auto gid = group_id(*config.group);
    if (!gid) return tl::unexpected(std::move(gid.error()));
    state->gid = *gid;
  }
  if (config.activity_interval <= 0ms || config.summary_interval <= 0ms) {
    return fail(ErrorCode::invalid_argument, "log intervals must be positive");
  }
  auto listener = listen_on(config.socket_path, state->gid);
  if (!listener) return tl::unexpected(std::move(listener.error()));
  state->listener = std::move(*listener);
  state->config = std::move(config);
  state->epoll = FileDescriptor(::epoll_create1(EPOLL_CLOEXEC));
  state->wake = FileDescriptor(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  state->timer = FileDescriptor(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (!state->epoll.valid() || !state->wake.valid() || !state->timer.valid()) return io_failure("server setup", errno);
  const auto interval = std::chrono::duration_cast<std::chrono::nanoseconds>(state->config.activity_interval);
  itimerspec spec{};
  spec.it_interval.tv_sec = static_cast<time_t>(interval.count() / 1'000'000'000);
  spec.it_interval.tv_nsec = static_cast<long>(interval.count() % 1'000'000'000);
  spec.it_value = spec.it_interval;
  if (::timerfd_settime(state->timer.get(), 0, &spec, nullptr) != 0) return io_failure("timerfd_settime", errno);
  for (const int fd : {state->listener.get(), state->wake.get(), state->timer.get()}) {
    if (auto watched = state->watch(fd, EPOLLIN); !watched) return tl::unexpected(std::move(watched.error()));
  }
  if (const std::optional<std::string>& address = state->config.metrics_address; address.has_value()) {
    auto metrics = listen_tcp(*address);
    if (!metrics) {
      ::unlink(state->config.socket_path.c_str());
      return tl::unexpected(std::move(metrics.error()));
    }
    state->metrics_listener = std::move(*metrics);
    sockaddr_in bound{};
    socklen_t length = sizeof(bound);
    (void)::getsockname(state->metrics_listener.get(), reinterpret_cast<sockaddr*>(&bound), &length);
    state->metrics_port = ntohs(bound.sin_port);
    std::array<char, INET_ADDRSTRLEN> host{};
    state->metrics_host = ::inet_ntop(AF_INET, &bound.sin_addr, host.data(), host.size()) != nullptr ? host.data() : "?";
    if (auto watched = state->watch(state->metrics_listener.get(), EPOLLIN); !watched) {
      return tl::unexpected(std::move(watched.error()));
    }
  }
  return std::unique_ptr<Server>(new Server(std::move(state)));
}

Server::Server(std::unique_ptr<State> state) : state_(std::move(state)) {}

Server::~Server() {
  // A server that never ran still owns its socket file.
  if (state_ && state_->listener.valid()) ::unlink(state_->config.socket_path.c_str());
}

const std::string& Server::socket_path() const { return state_->config.socket_path; }

std::optional<std::uint16_t> Server::metrics_port() const {
  if (!state_->metrics_listener.valid()) return std::nullopt;
  return state_->metrics_port;
}

void Server::stop() {
  const std::uint64_t one = 1;
  (void)::write(state_->wake.get(), &one, sizeof(one));
}

Result<void> Server::run(bool handle_signals) {
  State& s = *state_;
  if (handle_signals) {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (::pthread_sigmask(SIG_BLOCK, &mask, nullptr) != 0) return io_failure("pthread_sigmask", errno);
    s.signals = FileDescriptor(::signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC));
    if (!s.signals.valid()) return io_failure("signalfd", errno);
    if (auto watched = s.watch(s.signals.get(), EPOLLIN); !watched) return watched;
  }
  s.log(fmt::format("meshrt-alloc-server: listening on {} (pid {}, protocol version {})", s.config.socket_path,
                    ::getpid(), protocol::version));
  if (s.metrics_listener.valid()) {
    s.log(fmt::format("meshrt-alloc-server: Prometheus metrics at http://{}:{}/metrics", s.metrics_host, s.metrics_port));
  }
  auto result = s.loop();
  // Stop accepting first: a client must not connect to a server that is going away.
  (void)::epoll_ctl(s.epoll.get(), EPOLL_CTL_DEL, s.listener.get(), nullptr);
  s.listener.reset();
  ::unlink(s.config.socket_path.c_str());
  // Sessions still connected keep their buffers in the final figures.
  if (s.config.log_activity) {
    for (auto& [fd, connection] : s.connections) s.log_activity(*connection);
  }
  s.log("meshrt-alloc-server: stopping");
  s.log_summary();
  return result;
}

}  // namespace meshrt::server
