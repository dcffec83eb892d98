// meshrt-smi — what the allocation server sees, as nvidia-smi shows GPUs: per device DRAM and L1
// used/total, the processes using them, and the counters that reveal leaks.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

import meshrt.core;
import meshrt.protocol;
import meshrt.monitor;
import meshrt.memory_map;

using nlohmann::json;

namespace {

std::string bytes_text(std::uint64_t bytes) {
  std::string digits = std::to_string(bytes);
  for (auto at = static_cast<std::ptrdiff_t>(digits.size()) - 3; at > 0; at -= 3) digits.insert(static_cast<std::size_t>(at), ",");
  return digits;
}

std::string usage_cell(const json& usage) {
  const auto used = usage.value("used_bytes", std::uint64_t{0});
  const auto total = usage.value("total_bytes", std::uint64_t{0});
  if (total == 0) return fmt::format("{} B", bytes_text(used));
  return fmt::format("{} / {} B ({:.1f}%)", bytes_text(used), bytes_text(total),
                     100.0 * static_cast<double>(used) / static_cast<double>(total));
}

void print_summary(const json& summary) {
  const json& server = summary["server"];
  fmt::print("meshrt-smi    server pid {} on {}    up {:.0f} s\n", server.value("pid", 0), server.value("socket", ""),
             server.value("uptime_seconds", 0.0));
  constexpr std::string_view rule =
      "+--------+------------------------------------------+------------------------------------+---------+";
  fmt::print("{}\n| {:>6} | {:<40} | {:<34} | {:>7} |\n{}\n", rule, "Device", "DRAM used / total", "L1 used / total",
             "Buffers", rule);
  for (const json& device : summary["devices"]) {
    std::uint64_t buffers = 0;
    for (const char* type : {"dram", "l1", "l1_small", "trace"}) buffers += device[type].value("buffers", std::uint64_t{0});
    fmt::print("| {:>6} | {:<40} | {:<34} | {:>7} |\n", device.value("id", 0), usage_cell(device["dram"]),
               usage_cell(device["l1"]), buffers);
    // What the memory is for (ADR 0020): one line per category in use, DRAM and L1 beside each other.
    for (const std::string_view category : {"buffer", "system", "program", "circular_buffer"}) {
      const auto part = [&](const char* type, const char* field) {
        const json& categories = device[type].contains("categories") ? device[type]["categories"] : json::object();
        return categories.contains(category) ? categories[std::string(category)].value(field, std::uint64_t{0})
                                             : std::uint64_t{0};
      };
      std::uint64_t in_category = 0;
      for (const char* type : {"dram", "l1", "l1_small", "trace"}) in_category += part(type, "buffers");
      if (in_category == 0) continue;
      fmt::print("| {:>6} |   {:<15} {:<22} | {:<34} | {:>7} |\n", "", category,
                 bytes_text(part("dram", "used_bytes")) + " B", bytes_text(part("l1", "used_bytes")) + " B",
                 in_category);
    }
    for (const json& user : device["processes"]) {
      fmt::print("| {:>6} |   pid {:<8} {:<25} | {:<34} | {:>7} |\n", "", user.value("pid", 0),
                 bytes_text(user.value("dram_bytes", std::uint64_t{0})) + " B",
                 bytes_text(user.value("l1_bytes", std::uint64_t{0})) + " B", "");
    }
  }
  fmt::print("{}\n", rule);
  fmt::print("Processes:\n  {:>8}  {:<16} {:>14} {:>20} {:>12} {:>12}\n", "PID", "Name", "Live buffers", "Live bytes",
             "Allocations", "Frees");
  for (const json& process : summary["processes"]) {
    fmt::print("  {:>8}  {:<16} {:>14} {:>20} {:>12} {:>12}\n", process.value("pid", 0),
               process.value("name", std::string{}), process.value("live_allocations", std::uint64_t{0}),
               bytes_text(process.value("live_bytes", std::uint64_t{0})), process.value("allocations", std::uint64_t{0}),
               process.value("deallocations", std::uint64_t{0}));
  }
  if (summary["processes"].empty()) fmt::print("  (no process is tracking allocations)\n");
  fmt::print("Active allocations: {}   Unknown frees: {}   Double frees: {}   Reclaimed from crashed processes: {}   "
             "Leaked at exit: {}   Sequence gaps: {}   Malformed: {}   Rejected: {}\n",
             summary.value("active_allocations", 0), summary.value("unknown_deallocations", 0),
             summary.value("double_deallocations", 0), summary.value("reclaimed_allocations", 0),
             summary.value("leaked_at_exit", 0), summary.value("sequence_gaps", 0),
             summary.value("malformed_messages", 0), summary.value("rejected_sessions", 0));
}

std::string frame_text(const json& frame) {
  const std::string function = frame.value("function", std::string{});
  const std::string file = frame.value("file", std::string{});
  const auto line = frame.value("line", 0U);
  std::string text = function.empty() ? std::string("??") : function;
  if (!file.empty()) text += line > 0 ? fmt::format(" ({}:{})", file, line) : fmt::format(" ({})", file);
  return text;
}

// What ended processes left behind, grouped by call site, largest first (heaptrack's "most leaked").
void print_leaks(const json& reply, bool with_stacks) {
  const json& reports = reply["leaks"];
  if (reports.empty()) {
    fmt::print("no leaks: no process that ended left buffers behind (of the last the server keeps)\n");
    return;
  }
  for (const json& report : reports) {
    fmt::print("pid {} ({}): {} buffers, {} B {} ({:.0f} s ago)\n", report.value("pid", 0),
               report.value("name", std::string{}), report.value("buffers", std::uint64_t{0}),
               bytes_text(report.value("bytes", std::uint64_t{0})), report.value("how", std::string{}),
               report.value("ended_seconds_ago", 0.0));
    fmt::print("  {:>16} {:>8} {:>8}  {}\n", "Bytes", "Buffers", "Devices", "Call site");
    for (const json& site : report["sites"]) {
      std::string where = site.value("call_site", std::string{});
      if (where.empty()) where = "(no call stack: run with MESHRT_ALLOC_STACKS=1)";
      const auto names = site.value("names", std::vector<std::string>{});
      fmt::print("  {:>16} {:>8} {:>8}  {}{}\n", bytes_text(site.value("bytes", std::uint64_t{0})),
                 site.value("buffers", std::uint64_t{0}), site["devices"].size(), where,
                 names.empty() ? "" : fmt::format("  [{}]", fmt::join(names, ", ")));
      if (with_stacks) {
        for (const json& frame : site["stack"]) fmt::print("  {:>36}{}\n", "", frame_text(frame));
      }
    }
    if (report.value("sites_omitted", 0) > 0) {
      fmt::print("  ... and {} smaller call sites\n", report.value("sites_omitted", 0));
    }
  }
}

void print_buffers(const json& reply, bool with_stacks) {
  fmt::print("{:>8} {:>10} {:>10}  {:<20} {:>6}  {:<8} {:<15} {:>14} {:>16} {:>9}\n", "PID", "Buffer", "Mesh buf",
             "Name", "Device", "Type", "Category", "Address", "Size", "Age (s)");
  for (const json& b : reply["buffers"]) {
    fmt::print("{:>8} {:>10} {:>10}  {:<20} {:>6}  {:<8} {:<15} {:>#14x} {:>16} {:>9.1f}{}\n", b.value("pid", 0),
               b.value("buffer", std::uint64_t{0}), b.value("mesh_buffer", std::uint64_t{0}),
               b.value("name", std::string{}), b.value("device", 0), b.value("type", std::string{}),
               b.value("category", std::string{}),
               b.value("address", std::uint64_t{0}), bytes_text(b.value("size", std::uint64_t{0})),
               b.value("age_seconds", 0.0), b.value("hooked", false) ? "  (hooked)" : "");
    if (with_stacks) {
      const std::string where = b.value("call_site", std::string{});
      fmt::print("{:>10}allocated at {}\n", "", where.empty() ? "(no call stack: run with MESHRT_ALLOC_STACKS=1)" : where);
      if (b.contains("stack")) {
        for (const json& frame : b["stack"]) fmt::print("{:>12}{}\n", "", frame_text(frame));
      }
    }
  }
  fmt::print("{} live buffers\n", reply["buffers"].size());
}

// Draws the server's view as an SVG memory map; written beside the target, then renamed into place.
// Writes `text` to `path` whole or not at all: a reader never sees half a file.
bool write_whole(const std::string& path, const std::string& text) {
  const std::string temporary = path + ".tmp";
  std::ofstream file(temporary, std::ios::binary | std::ios::trunc);
  file << text;
  file.close();
  if (!file || std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    return false;
  }
  return true;
}

// --timeline FILE: the server's history as a Chrome trace (.json, for Perfetto) or a page (.html).
int write_timeline(meshrt::server::Monitor& monitor, const std::string& path, std::uint32_t pid) {
  const bool page = path.ends_with(".html") || path.ends_with(".htm");
  auto answer = monitor.query(meshrt::protocol::QueryKind::timeline, pid);
  if (!answer) {
    fmt::print(stderr, "meshrt-smi: {}\n", answer.error().message);
    return 1;
  }
  auto rendered = page ? meshrt::render_timeline_page(*answer) : meshrt::render_timeline_trace(*answer);
  if (!rendered) {
    fmt::print(stderr, "meshrt-smi: {}\n", rendered.error().message);
    return 1;
  }
  if (!write_whole(path, *rendered)) {
    fmt::print(stderr, "meshrt-smi: cannot write the timeline to {}\n", path);
    return 1;
  }
  const json timeline = json::parse(*answer)["timeline"];
  fmt::print("wrote {}: {} samples and {} moments{}{}\n", path, timeline["samples"].size(), timeline["moments"].size(),
             timeline.value("samples_dropped", std::uint64_t{0}) > 0
                 ? fmt::format(" ({} older samples dropped by the server's ring: raise --history-samples)",
                               timeline["samples_dropped"].get<std::uint64_t>())
                 : std::string{},
             page ? " (open it in a browser)" : " (open it in https://ui.perfetto.dev or chrome://tracing)");
  return 0;
}

int write_map(meshrt::server::Monitor& monitor, const std::string& path, std::optional<std::uint32_t> device) {
  auto summary = monitor.query(meshrt::protocol::QueryKind::summary);
  if (!summary) {
    fmt::print(stderr, "meshrt-smi: {}\n", summary.error().message);
    return 1;
  }
  auto buffers = monitor.query(meshrt::protocol::QueryKind::buffers);
  if (!buffers) {
    fmt::print(stderr, "meshrt-smi: {}\n", buffers.error().message);
    return 1;
  }
  auto svg = meshrt::render_memory_map(*summary, *buffers, device);
  if (!svg) {
    fmt::print(stderr, "meshrt-smi: {}\n", svg.error().message);
    return 1;
  }
  if (!write_whole(path, *svg)) {
    fmt::print(stderr, "meshrt-smi: cannot write the memory map to {}\n", path);
    return 1;
  }
  const auto live = json::parse(*buffers)["buffers"].size();
  if (device) {
    fmt::print("meshrt-smi: wrote the memory map of device {} to {}\n", *device, path);
  } else {
    fmt::print("meshrt-smi: wrote the memory map of {} live buffers to {}\n", live, path);
  }
  return 0;
}

int run(int argc, char** argv) {
  std::string socket = meshrt::protocol::default_socket_path();
  bool as_json = false;
  bool buffers = false;
  bool verify = false;
  bool stacks = false;
  bool leaks = false;
  std::uint32_t pid = 0;
  double watch = 0;
  std::string map;
  std::string timeline;
  CLI::App app{"meshrt-smi: the allocation server's view of device memory, per device, type and process"};
  app.add_option("--socket", socket, "the server's Unix socket ($MESHRT_ALLOC_SERVER)")->capture_default_str();
  app.add_flag("--json", as_json, "print one JSON object (per refresh with --watch)");
  app.add_option("--watch", watch, "refresh every SECONDS until interrupted")->check(CLI::Range(0.1, 86400.0));
  auto* buffers_flag = app.add_flag("--buffers", buffers, "list live buffers instead of the summary");
  auto* leaks_flag = app.add_flag(
      "--leaks", leaks,
      "what ended processes left behind (crashed, or exited with live buffers), grouped by call site, largest first");
  leaks_flag->excludes(buffers_flag);
  auto* pid_option = app.add_option("--pid", pid, "with --buffers, --leaks or --timeline: only this process");
  auto* stacks_flag = app.add_flag("--stacks", stacks,
               "with --buffers: each buffer's call site and stack; with --leaks: each site's stack "
               "(the process must run with MESHRT_ALLOC_STACKS=1)");
  auto* map_option =
      app.add_option("--map", map, "draw every device's memory as an SVG memory map into FILE (open it in a browser)")
          ->excludes("--watch")
          ->excludes("--json");
  app.add_option("--timeline", timeline,
                 "write the server's memory timeline (usage over time by device, type and process, and the "
                 "moments: starts, exits, crashes, leaks, out of memory) to FILE: FILE.json is a Chrome trace "
                 "(Perfetto, chrome://tracing), FILE.html a page that plots it")
      ->excludes("--watch")
      ->excludes("--json")
      ->excludes(map_option)
      ->excludes(buffers_flag)
      ->excludes(leaks_flag)
      ->check([](const std::string& path) {
        return path.ends_with(".json") || path.ends_with(".html") || path.ends_with(".htm")
                   ? std::string{}
                   : std::string("FILE must end in .json (a Chrome trace) or .html (a page)");
      });
  std::optional<std::uint32_t> map_device;
  app.add_option("--device", map_device, "with --map: only this device")->needs(map_option);
  app.add_flag("--verify", verify, "check that per-buffer, per-process and per-device totals agree (exit 1 if not)");
  app.set_version_flag("--version", fmt::format("meshrt-smi {} (protocol version {})", meshrt::runtime_version, meshrt::protocol::version));
  app.footer("Exit codes: 0 ok, 1 server unreachable or --verify found a difference, 2 bad usage.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::CallForVersion& version) {
    return app.exit(version);
  } catch (const CLI::ParseError& error) {
    fmt::print(stderr, "meshrt-smi: {}\n\n{}", error.what(), app.help());
    return 2;
  }
  for (const auto* option : {pid_option, stacks_flag}) {
    if (option->count() > 0 && !buffers && !leaks && (timeline.empty() || option == stacks_flag)) {
      fmt::print(stderr, "meshrt-smi: {} requires --buffers or --leaks{}\n\n{}", option->get_name(),
                 option == pid_option ? " or --timeline" : "", app.help());
      return 2;
    }
  }

  auto monitor = meshrt::server::Monitor::connect(socket);
  if (!monitor) {
    fmt::print(stderr, "meshrt-smi: {}\n", monitor.error().message);
    return 1;
  }
  if (!map.empty()) return write_map(*monitor, map, map_device);
  if (!timeline.empty()) return write_timeline(*monitor, timeline, pid);
  const auto kind = verify ? meshrt::protocol::QueryKind::verify
                    : buffers ? meshrt::protocol::QueryKind::buffers
                    : leaks ? meshrt::protocol::QueryKind::leaks
                            : meshrt::protocol::QueryKind::summary;
  for (;;) {
    auto answer = monitor->query(kind, pid, stacks && buffers);
    if (!answer) {
      fmt::print(stderr, "meshrt-smi: {}\n", answer.error().message);
      return 1;
    }
    auto reply = json::parse(*answer, nullptr, /*allow_exceptions=*/false);
    if (reply.is_discarded()) {
      fmt::print(stderr, "meshrt-smi: the server's reply is not JSON\n");
      return 1;
    }
    if (watch > 0 && !as_json && ::isatty(STDOUT_FILENO) != 0) fmt::print("\x1b[H\x1b[2J");
    if (as_json) {
      fmt::print("{}\n", reply.dump());
    } else if (verify) {
      if (reply.value("consistent", false)) {
        fmt::print("consistent: per-buffer, per-process and per-device totals agree for every buffer type\n");
      } else {
        fmt::print("INCONSISTENT:\n");
        for (const json& line : reply["differences"]) fmt::print("  {}\n", line.get<std::string>());
      }
    } else if (buffers) {
      print_buffers(reply, stacks);
    } else if (leaks) {
      print_leaks(reply, stacks);
    } else {
      print_summary(reply);
    }
    std::fflush(stdout);
    if (verify && !reply.value("consistent", false)) return 1;
    if (watch <= 0) return 0;
    std::this_thread::sleep_for(std::chrono::duration<double>(watch));
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    fmt::print(stderr, "meshrt-smi: {}\n", error.what());
    return 1;
  }
}
