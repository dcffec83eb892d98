// What the server says about its ledger: JSON for monitors, text lines for its log.
module;
#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

module meshrt.server:report;

import meshrt.core;
import meshrt.protocol;
import :ledger;
import :history;
import :server;

namespace meshrt::server {

struct ServerInfo {
  std::uint32_t pid{};
  std::string socket;
  double uptime_seconds{};
  std::int64_t now_ns{};
};

namespace report {

inline nlohmann::json usage_json(const Usage& usage, std::uint64_t total) {
  return {{"used_bytes", usage.bytes}, {"total_bytes", total}, {"peak_bytes", usage.peak_bytes},
          {"buffers", usage.buffers}};
}

inline std::string summary_json(const Summary& summary, const ConnectionCounters& connections,
                                const ServerInfo& info) {
  nlohmann::json devices = nlohmann::json::array();
  for (const DeviceSummary& device : summary.devices) {
    nlohmann::json entry{{"id", device.device}};
    for (const BufferType type : all_buffer_types) {
      nlohmann::json usage = usage_json(device.usage[index_of(type)], device.total_bytes[index_of(type)]);
      usage["banks"] = device.bank_count[index_of(type)];
      usage["base_address"] = device.base_address[index_of(type)];
      nlohmann::json categories = nlohmann::json::object();
      for (const AllocationCategory category : all_allocation_categories) {
        const Usage& part = device.categories[index_of(type)][index_of(category)];
        categories[std::string(to_string(category))] = {{"used_bytes", part.bytes}, {"buffers", part.buffers}};
      }
      usage["categories"] = std::move(categories);
      entry[std::string(to_string(type))] = std::move(usage);
    }
    nlohmann::json users = nlohmann::json::array();
    for (const ProcessSummary& process : summary.processes) {
      const auto found = process.devices.find(device.device);
      if (found == process.devices.end()) continue;
      nlohmann::json user{{"pid", process.identity.pid}, {"name", process.identity.name}};
      std::uint64_t buffers = 0;
      for (const BufferType type : all_buffer_types) {
        user[fmt::format("{}_bytes", to_string(type))] = found->second[index_of(type)].bytes;
        buffers += found->second[index_of(type)].buffers;
      }
      if (buffers > 0) users.push_back(std::move(user));
    }
    entry["processes"] = std::move(users);
    devices.push_back(std::move(entry));
  }
  nlohmann::json processes = nlohmann::json::array();
  for (const ProcessSummary& process : summary.processes) {
    nlohmann::json peaks;
    for (const BufferType type : all_buffer_types) {
      std::uint64_t peak = 0;
      for (const auto& [device, usage] : process.devices) peak = std::max(peak, usage[index_of(type)].peak_bytes);
      peaks[std::string(to_string(type))] = peak;
    }
    processes.push_back({{"pid", process.identity.pid},
                         {"uid", process.identity.uid},
                         {"name", process.identity.name},
                         {"start_time", process.identity.start_time},
                         {"session", process.session},
                         {"live_allocations", process.live_allocations},
                         {"live_bytes", process.live_bytes},
                         {"allocations", process.allocations},
                         {"deallocations", process.deallocations},
                         {"peak_bytes_per_device", std::move(peaks)}});
  }
  const Counters& c = summary.counters;
  const nlohmann::json json{
      {"server", {{"pid", info.pid}, {"socket", info.socket}, {"uptime_seconds", info.uptime_seconds}}},
      {"active_allocations", summary.active_allocations},
      {"unknown_deallocations", c.unknown_deallocations},
      {"double_deallocations", c.double_deallocations},
      {"duplicate_allocations", c.duplicate_allocations},
      {"reclaimed_allocations", c.reclaimed_allocations},
      {"leaked_at_exit", c.leaked_at_exit},
      {"lost_at_exit", c.lost_at_exit},
      {"refused_allocations", c.refused_allocations},
      {"conflicting_device_info", c.conflicting_device_info},
      {"sequence_gaps", c.sequence_gaps},
      {"resyncs", c.resyncs},
      {"call_stacks_dropped", c.call_stacks_dropped},
      {"total_allocations", c.allocations},
      {"total_deallocations", c.deallocations},
      {"malformed_messages", connections.malformed_messages},
      {"truncated_sessions", connections.truncated_sessions},
      {"rejected_sessions", connections.rejected_sessions},
      {"timed_out_sessions", connections.timed_out_sessions},
      {"dropped_slow_readers", connections.dropped_slow_readers},
      {"sessions_opened", connections.sessions_opened},
      {"devices", std::move(devices)},
      {"processes", std::move(processes)},
  };
  return json.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

inline std::string verification_json(const Verification& verification) {
  return nlohmann::json{{"consistent", verification.consistent}, {"differences", verification.differences}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

inline std::string type_usage_text(const Usage& usage, std::uint64_t total, BufferType type) {
  if (total != 0) return fmt::format("{} {} / {} B ({} buffers)", to_string(type), usage.bytes, total, usage.buffers);
  return fmt::format("{} {} B ({} buffers)", to_string(type), usage.bytes, usage.buffers);
}

// The summary as log lines; the last is always "Active allocations: N".
inline std::vector<std::string> summary_lines(const Summary& summary, const ConnectionCounters& connections) {
  std::vector<std::string> lines;
  lines.push_back(fmt::format("Summary: {} process{} connected", summary.processes.size(),
                              summary.processes.size() == 1 ? "" : "es"));
  for (const DeviceSummary& device : summary.devices) {
    std::string line = fmt::format("  Device {}:", device.device);
    for (const BufferType type : all_buffer_types) {
      const Usage& usage = device.usage[index_of(type)];
      if (usage.buffers == 0 && type != BufferType::dram && type != BufferType::l1) continue;
      line += " " + type_usage_text(usage, device.total_bytes[index_of(type)], type) + ";";
    }
    line.pop_back();
    lines.push_back(std::move(line));
  }
  for (const ProcessSummary& process : summary.processes) {
    lines.push_back(fmt::format("  pid {} ({}): {} live buffers, {} bytes", process.identity.pid,
                                process.identity.name, process.live_allocations, process.live_bytes));
  }
  const Counters& c = summary.counters;
  lines.push_back(fmt::format("  Unknown deallocations: {}, double deallocations: {}, reclaimed from crashed "
                              "processes: {}, leaked at exit: {}, lost at exit (client gave up): {}, sequence gaps: {}, "
                              "malformed: {}, rejected: {}",
                              c.unknown_deallocations, c.double_deallocations, c.reclaimed_allocations,
                              c.leaked_at_exit, c.lost_at_exit, c.sequence_gaps, connections.malformed_messages,
                              connections.rejected_sessions));
  lines.push_back(fmt::format("Active allocations: {}", summary.active_allocations));
  return lines;
}

inline nlohmann::json frames_json(const protocol::CallStack& stack) {
  nlohmann::json frames = nlohmann::json::array();
  for (const protocol::StackFrame& frame : stack.frames) {
    frames.push_back({{"file", frame.file}, {"function", frame.function}, {"interpreted", frame.interpreted},
                      {"line", frame.line}});
  }
  return frames;
}

// What ended sessions left behind, each process's call sites largest first.
inline std::string leaks_json(const std::vector<LeakReport>& reports, std::int64_t now_ns) {
  nlohmann::json list = nlohmann::json::array();
  for (const LeakReport& report : reports) {
    const Reclaim& r = report.reclaim;
    nlohmann::json sites = nlohmann::json::array();
    for (const LeakSite& site : r.sites) {
      sites.push_back({{"call_site", site.call_site()},
                       {"bytes", site.bytes},
                       {"buffers", site.buffers},
                       {"devices", site.devices},
                       {"names", site.names},
                       {"stacks", site.stacks},
                       {"stack", frames_json(site.stack)}});
    }
    list.push_back({{"pid", r.identity.pid},
                    {"name", r.identity.name},
                    {"session", report.session},
                    {"how", std::string(to_string(report.how))},
                    {"ended_seconds_ago", static_cast<double>(now_ns - report.ended_ns) / 1e9},
                    {"buffers", r.buffers},
                    {"bytes", r.bytes},
                    {"sites_omitted", r.sites_omitted},
                    {"sites", std::move(sites)}});
  }
  return nlohmann::json{{"leaks", std::move(list)}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// The timeline (ADR 0025): series points as [time_ns, pid, device, type, category, bytes] (pid 0:
// a category's series over every process; category "all": one process's series), and moments.
// With a pid, only that process's series and moments.
inline std::string timeline_json(const History& history, std::uint32_t pid, std::int64_t now_ns) {
  nlohmann::json samples = nlohmann::json::array();
  for (const HistorySample& s : history.samples()) {
    if (pid != 0 && s.pid != pid) continue;
    const std::string_view category =
        s.category == all_categories ? std::string_view("all")
                                     : to_string(all_allocation_categories.at(s.category % allocation_category_count));
    samples.push_back({s.time_ns, s.pid, s.device, std::string(to_string(all_buffer_types.at(s.type % buffer_type_count))),
                       std::string(category), s.bytes});
  }
  nlohmann::json moments = nlohmann::json::array();
  for (const Moment& m : history.moments()) {
    if (pid != 0 && m.pid != pid) continue;
    moments.push_back({{"time_ns", m.time_ns},
                       {"kind", std::string(to_string(m.kind))},
                       {"pid", m.pid},
                       {"process", m.process},
                       {"buffers", m.buffers},
                       {"bytes", m.bytes},
                       {"detail", m.detail}});
  }
  nlohmann::json processes = nlohmann::json::array();
  for (const auto& [process_pid, name] : history.process_names()) {
    if (pid == 0 || process_pid == pid) processes.push_back({{"pid", process_pid}, {"name", name}});
  }
  return nlohmann::json{{"timeline",
                         {{"now_ns", now_ns},
                          {"max_samples", history.max_samples()},
                          {"bytes_per_sample", History::bytes_per_sample()},
                          {"samples_taken", history.samples_taken()},
                          {"samples_dropped", history.samples_dropped()},
                          {"moments_dropped", history.moments_dropped()},
                          {"min_interval_ms", History::min_interval.count()},
                          {"processes", std::move(processes)},
                          {"samples", std::move(samples)},
                          {"moments", std::move(moments)}}}}
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// The largest call sites of a reclaim, for the log: the first few, and how many more.
inline std::vector<std::string> leak_site_lines(const Reclaim& reclaim) {
  constexpr std::size_t shown = 3;
  std::vector<std::string> lines;
  const bool any_stack = std::ranges::any_of(reclaim.sites, [](const LeakSite& s) { return !s.stack.frames.empty(); });
  if (!any_stack) return lines;
  for (std::size_t i = 0; i < reclaim.sites.size() && i < shown; ++i) {
    const LeakSite& site = reclaim.sites[i];
    const std::string where = site.call_site();
    lines.push_back(fmt::format("  {} B in {} buffers on {} devices from {}", site.bytes, site.buffers,
                                site.devices.size(), where.empty() ? "(no call stack)" : where));
  }
  const std::size_t sites = reclaim.sites.size() + reclaim.sites_omitted;
  if (sites > shown) lines.push_back(fmt::format("  and {} more call sites (meshrt-smi --leaks)", sites - shown));
  return lines;
}

inline std::string reclaim_text(const Reclaim& reclaim) {
  std::string detail;
  for (const auto& [device, usage] : reclaim.devices) {
    for (const BufferType type : all_buffer_types) {
      const Usage& u = usage[index_of(type)];
      if (u.buffers == 0) continue;
      detail += fmt::format("{}Device {} {} {} B in {}", detail.empty() ? "" : "; ", device, to_string(type), u.bytes,
                            u.buffers);
    }
  }
  return detail;
}

}  // namespace report
}  // namespace meshrt::server
