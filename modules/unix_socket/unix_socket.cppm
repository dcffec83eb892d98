// meshrt.unix_socket — the one place that turns a socket path into a connected or listening
// Unix stream socket: the allocation server, the tracking client and the monitor all use it, so
// the rules on paths, errors and the socket's directory are written once (ADR 0019).
module;
#include <optional>
#include <string>
#include <utility>

#include <sys/types.h>

export module meshrt.unix_socket;

import meshrt.core;

export namespace meshrt {

// Owns one file descriptor; closes it when destroyed. Move-only.
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
  // Gives the descriptor up without closing it.
  [[nodiscard]] int release_ownership() { return std::exchange(fd_, -1); }
  void reset();

 private:
  int fd_{-1};
};

namespace unix_socket {

enum class Blocking : bool { no, yes };

// Connects to the socket at `path`. Without blocking, a listener whose backlog is full refuses at
// once. Errors: invalid_argument (the path is empty or longer than a socket path may be),
// limit_exceeded (the backlog is full: a server that is there but not accepting), io_error (no
// server there, or another reason, named).
[[nodiscard]] Result<FileDescriptor> connect(const std::string& path, Blocking blocking);

// Listens at `path`, non-blocking and close-on-exec. The socket's directory is created 0700
// (0750 with a group) when missing, and must belong to this user or root when present; the socket
// is 0600 (0660 and given to the group with one). A socket file left by a dead server is
// replaced; a live server is never displaced (invalid_argument, naming the path).
[[nodiscard]] Result<FileDescriptor> listen(const std::string& path, std::optional<gid_t> group);

// The id of the group called `name`; not_found, with what to do, when there is none.
[[nodiscard]] Result<gid_t> group_id(const std::string& name);

}  // namespace unix_socket

}  // namespace meshrt
