module;
#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.unix_socket;

import meshrt.core;

namespace meshrt {

void FileDescriptor::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

namespace unix_socket {

namespace {

std::string describe_errno(int error) { return std::system_category().message(error); }

tl::unexpected<Error> io_failure(std::string_view what, int error) {
  return fail(ErrorCode::io_error, fmt::format("{}: {}", what, describe_errno(error)));
}

Result<sockaddr_un> address_of(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty()) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("the socket path is empty: it must be 1 to {} bytes long", sizeof(address.sun_path) - 1));
  }
  if (path.size() >= sizeof(address.sun_path)) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("socket path '{}' is too long ({} bytes): it must be 1 to {} bytes long", path,
                            path.size(), sizeof(address.sun_path) - 1));
  }
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  return address;
}

int connect_to(int fd, const sockaddr_un& address) {
  return ::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address));
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
    return fail(ErrorCode::invalid_argument,
                fmt::format("{} exists and is not a socket: remove it or choose another --socket", path));
  }
  const FileDescriptor probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe.valid()) return io_failure("socket", errno);
  if (connect_to(probe.get(), address) == 0) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("another allocation server is already listening on {}", path));
  }
  if (::unlink(path.c_str()) != 0) return io_failure(fmt::format("cannot remove the stale socket {}", path), errno);
  return {};
}

}  // namespace

Result<FileDescriptor> connect(const std::string& path, Blocking blocking) {
  auto address = address_of(path);
  if (!address) return tl::unexpected(std::move(address.error()));
  const int flags = SOCK_STREAM | SOCK_CLOEXEC | (blocking == Blocking::no ? SOCK_NONBLOCK : 0);
  FileDescriptor fd(::socket(AF_UNIX, flags, 0));
  if (!fd.valid()) return io_failure("socket", errno);
  if (connect_to(fd.get(), *address) != 0) {
    const int error = errno;
    // EAGAIN: the listen backlog is full, a server that is there but not accepting.
    if (error == EAGAIN) {
      return fail(ErrorCode::limit_exceeded,
                  fmt::format("the allocation server at {} accepts no connections: its backlog is full", path));
    }
    return fail(ErrorCode::io_error, fmt::format("no allocation server at {} ({})", path, describe_errno(error)));
  }
  return fd;
}

Result<FileDescriptor> listen(const std::string& path, std::optional<gid_t> group) {
  auto address = address_of(path);
  if (!address) return tl::unexpected(std::move(address.error()));
  if (auto ready = prepare_directory(path, group); !ready) return tl::unexpected(std::move(ready.error()));
  if (auto cleared = clear_stale_socket(path, *address); !cleared) return tl::unexpected(std::move(cleared.error()));
  FileDescriptor listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listener.valid()) return io_failure("socket", errno);
  const mode_t mode = group ? 0660 : 0600;
  // The umask makes the socket private from the moment it exists; chmod then sets it exactly.
  const mode_t old_umask = ::umask(0177);
  const int bound = ::bind(listener.get(), reinterpret_cast<const sockaddr*>(&*address), sizeof(*address));
  const int bind_error = errno;
  ::umask(old_umask);
  if (bound != 0) return io_failure(fmt::format("cannot bind {}", path), bind_error);
  if (::chmod(path.c_str(), mode) != 0) return io_failure(fmt::format("cannot chmod {}", path), errno);
  if (group && ::chown(path.c_str(), static_cast<uid_t>(-1), *group) != 0) {
    return io_failure(fmt::format("cannot give {} to the group", path), errno);
  }
  if (::listen(listener.get(), SOMAXCONN) != 0) return io_failure("listen", errno);
  return listener;
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

}  // namespace unix_socket

}  // namespace meshrt
