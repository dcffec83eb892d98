module;
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>

#include <sys/socket.h>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.server;

import meshrt.core;
import :peer;

namespace meshrt::server {

namespace {

std::uint64_t process_start_time(std::uint32_t pid) {
  std::ifstream file(fmt::format("/proc/{}/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto close_paren = stat.rfind(')');
  if (close_paren == std::string::npos || close_paren + 2 > stat.size()) return 0;
  std::istringstream fields(stat.substr(close_paren + 2));
  std::string field;
  // After "pid (comm) " the state is field 3; the start time is field 22.
  for (int index = 3; index <= 22 && fields >> field; ++index) {
    if (index == 22) return std::stoull(field);
  }
  return 0;
}

std::string process_name(std::uint32_t pid) {
  std::ifstream file(fmt::format("/proc/{}/comm", pid));
  std::string name;
  std::getline(file, name);
  return printable(name);
}

}  // namespace

Result<Peer> identify_peer(int fd) {
  ucred credentials{};
  socklen_t length = sizeof(credentials);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) {
    return fail(ErrorCode::io_error, fmt::format("SO_PEERCRED: {}", std::system_category().message(errno)));
  }
  const auto pid = static_cast<std::uint32_t>(credentials.pid);
  return Peer{.pid = pid, .uid = credentials.uid, .start_time = process_start_time(pid), .name = process_name(pid)};
}

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

}  // namespace meshrt::server
