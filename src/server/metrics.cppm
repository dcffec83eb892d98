// The ledger in the Prometheus text exposition format (version 0.0.4), and the little HTTP the
// server's epoll loop needs to serve it: one GET, one response, close (ADR 0014).
module;
#include <array>
#include <charconv>
#include <cstddef>
#include <iterator>
#include <system_error>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

module meshrt.server:metrics;

import meshrt.core;
import :ledger;
import :server;

namespace meshrt::server::metrics {

// A label value with \, " and newline escaped, as the text format requires.
inline std::string label_value(std::string_view value) {
  std::string escaped;
  escaped.reserve(value.size());
  for (const char c : value) {
    if (c == '\\') {
      escaped += "\\\\";
    } else if (c == '"') {
      escaped += "\\\"";
    } else if (c == '\n') {
      escaped += "\\n";
    } else {
      escaped += c;
    }
  }
  return escaped;
}

class Exposition {
 public:
  // Starts a metric family: its HELP and TYPE lines come once, before its samples.
  Exposition& family(std::string_view name, std::string_view type, std::string_view help) {
    fmt::format_to(std::back_inserter(text_), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
    name_ = name;
    return *this;
  }
  Exposition& sample(std::uint64_t value, std::string_view labels = {}) {
    if (labels.empty()) {
      fmt::format_to(std::back_inserter(text_), "{} {}\n", name_, value);
    } else {
      fmt::format_to(std::back_inserter(text_), "{}{{{}}} {}\n", name_, labels, value);
    }
    return *this;
  }
  [[nodiscard]] std::string take() { return std::move(text_); }

 private:
  std::string text_;
  std::string_view name_;
};

struct ServerFacts {
  std::string_view version;
  std::uint32_t protocol_version{};
  std::int64_t start_time_seconds{};  // Unix time
};

inline std::string exposition(const Summary& summary, const ConnectionCounters& connections, const ServerFacts& facts) {
  Exposition out;
  out.family("meshrt_build_info", "gauge", "The server's version and wire protocol version; always 1.")
      .sample(1, fmt::format(R"(version="{}",protocol="{}")", facts.version, facts.protocol_version));
  out.family("meshrt_server_start_time_seconds", "gauge", "When the server started, in seconds since the Unix epoch.")
      .sample(static_cast<std::uint64_t>(facts.start_time_seconds));

  const auto per_device = [&](std::string_view name, std::string_view help, auto value) {
    out.family(name, "gauge", help);
    for (const DeviceSummary& device : summary.devices) {
      for (const BufferType type : all_buffer_types) {
        out.sample(value(device, index_of(type)), fmt::format(R"(device="{}",type="{}")", device.device, to_string(type)));
      }
    }
  };
  // Used bytes and live buffers carry a category label (ADR 0020): sum over it for a type's total.
  const auto per_device_category = [&](std::string_view name, std::string_view help, auto value) {
    out.family(name, "gauge", help);
    for (const DeviceSummary& device : summary.devices) {
      for (const BufferType type : all_buffer_types) {
        for (const AllocationCategory category : all_allocation_categories) {
          out.sample(value(device.categories[index_of(type)][index_of(category)]),
                     fmt::format(R"(device="{}",type="{}",category="{}")", device.device, to_string(type),
                                 to_string(category)));
        }
      }
    }
  };
  per_device_category("meshrt_device_memory_used_bytes",
                      "Bytes of device memory held by live buffers, by device, buffer type and allocation category.",
                      [](const Usage& u) { return u.bytes; });
  per_device("meshrt_device_memory_total_bytes", "Bytes of device memory there are, by device and buffer type (0 if no client said).",
             [](const DeviceSummary& d, std::size_t t) { return d.total_bytes[t]; });
  per_device("meshrt_device_memory_peak_bytes", "The most bytes ever held at once, by device and buffer type.",
             [](const DeviceSummary& d, std::size_t t) { return d.usage[t].peak_bytes; });
  per_device_category("meshrt_device_buffers", "Live buffers, by device, buffer type and allocation category.",
                      [](const Usage& u) { return u.buffers; });

  out.family("meshrt_active_allocations", "gauge", "Live device buffers, all devices and processes.")
      .sample(summary.active_allocations);
  out.family("meshrt_processes", "gauge", "Processes with a tracking session.").sample(summary.processes.size());
  const auto per_process = [&](std::string_view name, std::string_view help, auto value) {
    out.family(name, "gauge", help);
    for (const ProcessSummary& p : summary.processes) {
      // One pid may hold several sessions (one per tracker): the session keeps the series apart.
      out.sample(value(p), fmt::format(R"(pid="{}",process="{}",session="{}")", p.identity.pid,
                                       label_value(p.identity.name), p.session));
    }
  };
  per_process("meshrt_process_live_bytes", "Bytes of device memory a process holds, all devices and types.",
              [](const ProcessSummary& p) { return p.live_bytes; });
  per_process("meshrt_process_live_allocations", "Live device buffers a process holds.",
              [](const ProcessSummary& p) { return p.live_allocations; });

  const Counters& c = summary.counters;
  const auto counter = [&](std::string_view name, std::string_view help, std::uint64_t value) {
    out.family(name, "counter", help).sample(value);
  };
  counter("meshrt_allocations_total", "Device buffer allocations applied.", c.allocations);
  counter("meshrt_deallocations_total", "Device buffer frees that matched a live buffer.", c.deallocations);
  counter("meshrt_unknown_deallocations_total", "Frees of a buffer the process never had live.", c.unknown_deallocations);
  counter("meshrt_double_deallocations_total", "Frees of a buffer the process had already freed.", c.double_deallocations);
  counter("meshrt_reclaimed_allocations_total", "Live buffers of processes that ended without Goodbye (crashed).",
          c.reclaimed_allocations);
  counter("meshrt_leaked_at_exit_total", "Live buffers of processes that said Goodbye still holding them.",
          c.leaked_at_exit);
  counter("meshrt_lost_at_exit_total",
          "Live buffers of processes whose client gave up on a server too slow for its shutdown timeout.",
          c.lost_at_exit);
  counter("meshrt_conflicting_device_info_total",
          "Device totals a process reported that disagreed with another live process's.", c.conflicting_device_info);
  counter("meshrt_sequence_gaps_total", "Event batches that did not follow the previous one.", c.sequence_gaps);
  counter("meshrt_resyncs_total", "Snapshots of a client's live table applied.", c.resyncs);
  counter("meshrt_sessions_opened_total", "Client and monitor sessions accepted.", connections.sessions_opened);
  out.family("meshrt_rejected_messages_total", "counter",
             "Sessions closed for what they sent: malformed or cut-off frames, a limit, silence before Hello, unread replies.")
      .sample(connections.malformed_messages, R"(reason="malformed")")
      .sample(connections.truncated_sessions, R"(reason="truncated")")
      .sample(connections.rejected_sessions, R"(reason="refused")")
      .sample(connections.timed_out_sessions, R"(reason="timeout")")
      .sample(connections.dropped_slow_readers, R"(reason="slow_reader")");
  return out.take();
}

// ---- HTTP: just enough for a scraper ----

inline constexpr std::size_t max_request_bytes = 8192;

struct Response {
  int status{};
  std::string_view reason;
  std::string content_type;
  std::string body;
  bool head_only{false};  // HEAD: the headers of the GET, without its body
};

inline std::string serialize(const Response& response) {
  return fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n{}",
                     response.status, response.reason, response.content_type, response.body.size(),
                     response.status == 405 ? "Allow: GET, HEAD\r\n" : "",
                     response.head_only ? std::string_view{} : std::string_view(response.body));
}

// Where the request head ends (just past its blank line), or npos. Lenient, as HTTP asks of
// servers: lines may end in LF alone.
inline std::size_t end_of_head(std::string_view input) {
  const auto crlf = input.find("\r\n\r\n");
  const auto lf = input.find("\n\n");
  if (crlf == std::string_view::npos && lf == std::string_view::npos) return std::string_view::npos;
  if (lf == std::string_view::npos || (crlf != std::string_view::npos && crlf < lf)) return crlf + 4;
  return lf + 2;
}

// What to answer a request whose head (through the blank line) is `head`.
// `metrics` is called only for a GET of /metrics.
template <class Metrics>
Response respond(std::string_view head, const Metrics& metrics) {
  std::string_view line = head.substr(0, head.find('\n'));
  if (line.ends_with('\r')) line.remove_suffix(1);
  const auto first_space = line.find(' ');
  const auto second_space = line.find(' ', first_space == std::string_view::npos ? line.size() : first_space + 1);
  if (first_space == std::string_view::npos || second_space == std::string_view::npos ||
      !line.substr(second_space + 1).starts_with("HTTP/1.")) {
    return {400, "Bad Request", "text/plain; charset=utf-8", "meshrt-alloc-server: not an HTTP/1.x request\n"};
  }
  const std::string_view method = line.substr(0, first_space);
  std::string_view target = line.substr(first_space + 1, second_space - first_space - 1);
  target = target.substr(0, target.find('?'));  // scrapers may add parameters; there are none
  if (target != "/metrics") {
    return {404, "Not Found", "text/plain; charset=utf-8", "meshrt-alloc-server serves only /metrics\n"};
  }
  if (method != "GET" && method != "HEAD") {
    return {405, "Method Not Allowed", "text/plain; charset=utf-8", "/metrics answers GET only\n"};
  }
  Response response{200, "OK", "text/plain; version=0.0.4; charset=utf-8", metrics()};
  response.head_only = method == "HEAD";
  return response;
}

struct ListenAddress {
  std::string host;
  std::uint16_t port{};
};

// "127.0.0.1:9464", ":9464" (loopback) or "0.0.0.0:9464" (every interface, on purpose).
inline Result<ListenAddress> parse_listen_address(std::string_view text) {
  const auto colon = text.rfind(':');
  const auto bad = [&](std::string_view why) {
    return fail(ErrorCode::invalid_argument,
                               fmt::format("bad metrics address '{}': {} (expected HOST:PORT, e.g. 127.0.0.1:9464)",
                                           text, why));
  };
  if (colon == std::string_view::npos) return bad("no port");
  const std::string_view port_text = text.substr(colon + 1);
  unsigned port = 0;
  const auto [end, error] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || error != std::errc{} || end != port_text.data() + port_text.size() || port > 65535) {
    return bad("the port must be a number from 0 to 65535");
  }
  ListenAddress address{std::string(text.substr(0, colon)), static_cast<std::uint16_t>(port)};
  if (address.host.empty() || address.host == "localhost") address.host = "127.0.0.1";
  return address;
}

}  // namespace meshrt::server::metrics
