module;
#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <gsl/gsl>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;

namespace meshrt::server {

namespace {

void grow(Usage& usage, std::uint64_t bytes) {
  usage.bytes += bytes;
  ++usage.buffers;
  usage.peak_bytes = std::max(usage.peak_bytes, usage.bytes);
}

void shrink(Usage& usage, std::uint64_t bytes) {
  Expects(usage.bytes >= bytes && usage.buffers > 0);
  usage.bytes -= bytes;
  --usage.buffers;
}

}  // namespace

SessionId Ledger::open_session(SessionIdentity identity) {
  const SessionId id = next_session_++;
  sessions_[id].identity = std::move(identity);
  return id;
}

Ledger::Session& Ledger::session(SessionId id) {
  const auto found = sessions_.find(id);
  Expects(found != sessions_.end());
  return found->second;
}

const SessionIdentity& Ledger::identity(SessionId session) const {
  const auto found = sessions_.find(session);
  Expects(found != sessions_.end());
  return found->second.identity;
}

std::uint64_t Ledger::live_allocations(SessionId session) const {
  const auto found = sessions_.find(session);
  return found == sessions_.end() ? 0 : found->second.live.size();
}

void Ledger::add(Session& s, std::uint64_t buffer, const Entry& entry) {
  const auto [it, inserted] = s.live.try_emplace(buffer, entry);
  if (!inserted) {
    ++counters_.duplicate_allocations;
    return;
  }
  const std::size_t type = index_of(entry.type);
  grow(devices_[entry.device][type], entry.size);
  grow(s.devices[entry.device][type], entry.size);
  s.live_bytes += entry.size;
  ++active_allocations_;
  if (const auto name = s.names.find(entry.mesh_buffer); name != s.names.end()) ++name->second.live;
}

void Ledger::remove(Session& s, std::unordered_map<std::uint64_t, Entry>::iterator found) {
  const Entry& entry = found->second;
  const std::size_t type = index_of(entry.type);
  shrink(devices_[entry.device][type], entry.size);
  shrink(s.devices[entry.device][type], entry.size);
  s.live_bytes -= entry.size;
  --active_allocations_;
  if (const auto name = s.names.find(entry.mesh_buffer); name != s.names.end() && --name->second.live == 0) {
    s.names.erase(name);
  }
  s.live.erase(found);
}

void Ledger::remember_free(Session& s, std::uint64_t buffer) {
  if (!s.recent_frees.insert(buffer).second) return;
  s.recent_free_order.push_back(buffer);
  if (s.recent_free_order.size() > recent_frees_remembered) {
    s.recent_frees.erase(s.recent_free_order.front());
    s.recent_free_order.pop_front();
  }
}

bool Ledger::check_sequence(SessionId id, std::uint64_t first_sequence, std::uint64_t count) {
  Session& s = session(id);
  const bool in_order = first_sequence == s.next_sequence;
  if (!in_order) ++counters_.sequence_gaps;
  s.next_sequence = first_sequence + count;
  return in_order;
}

void Ledger::apply_alloc(SessionId id, const protocol::AllocRecord& record) {
  Session& s = session(id);
  ++counters_.allocations;
  ++s.allocations;
  add(s, record.buffer,
      Entry{record.mesh_buffer, record.address, record.size, record.time_ns, record.device, record.type, record.hooked});
}

FreeOutcome Ledger::apply_free(SessionId id, const protocol::FreeRecord& record) {
  Session& s = session(id);
  const auto found = s.live.find(record.buffer);
  if (found == s.live.end()) {
    if (s.recent_frees.contains(record.buffer)) {
      ++counters_.double_deallocations;
      return {FreeOutcome::Kind::double_free};
    }
    ++counters_.unknown_deallocations;
    return {FreeOutcome::Kind::unknown};
  }
  const FreeOutcome outcome{FreeOutcome::Kind::freed, found->second.device, found->second.type, found->second.size};
  ++counters_.deallocations;
  ++s.deallocations;
  remove(s, found);
  remember_free(s, record.buffer);
  return outcome;
}

void Ledger::name_mesh_buffer(SessionId id, std::uint64_t mesh_buffer, std::string name) {
  Session& s = session(id);
  auto& entry = s.names[mesh_buffer];
  entry.text = std::move(name);
}

void Ledger::set_device_totals(const protocol::DeviceTotals& totals) {
  device_totals_[totals.device] = totals.total_bytes;
  devices_.try_emplace(totals.device);  // a known device shows up even while empty
}

void Ledger::begin_snapshot(SessionId id) {
  Session& s = session(id);
  while (!s.live.empty()) remove(s, s.live.begin());
  s.recent_frees.clear();
  s.recent_free_order.clear();
}

void Ledger::apply_snapshot_record(SessionId id, const protocol::AllocRecord& record) {
  Session& s = session(id);
  add(s, record.buffer,
      Entry{record.mesh_buffer, record.address, record.size, record.time_ns, record.device, record.type, record.hooked});
}

void Ledger::end_snapshot(SessionId id, std::uint64_t next_sequence) {
  session(id).next_sequence = next_sequence;
  ++counters_.resyncs;
}

Reclaim Ledger::close_session(SessionId id, SessionEnd how) {
  Session& s = session(id);
  Reclaim reclaim{.identity = s.identity, .buffers = s.live.size(), .bytes = s.live_bytes};
  for (const auto& [device, usage] : s.devices) {
    if (std::ranges::any_of(usage, [](const Usage& u) { return u.buffers > 0; })) reclaim.devices[device] = usage;
  }
  (how == SessionEnd::goodbye ? counters_.leaked_at_exit : counters_.reclaimed_allocations) += s.live.size();
  while (!s.live.empty()) remove(s, s.live.begin());
  sessions_.erase(id);
  return reclaim;
}

Summary Ledger::summary() const {
  Summary summary{.active_allocations = active_allocations_, .counters = counters_};
  summary.devices.reserve(devices_.size());
  for (const auto& [device, usage] : devices_) {
    DeviceSummary d{.device = device, .usage = usage};
    if (const auto totals = device_totals_.find(device); totals != device_totals_.end()) d.total_bytes = totals->second;
    summary.devices.push_back(d);
  }
  summary.processes.reserve(sessions_.size());
  for (const auto& [id, s] : sessions_) {
    summary.processes.push_back(ProcessSummary{
        .session = id,
        .identity = s.identity,
        .live_allocations = s.live.size(),
        .live_bytes = s.live_bytes,
        .allocations = s.allocations,
        .deallocations = s.deallocations,
        .devices = s.devices,
    });
  }
  return summary;
}

std::vector<LiveBuffer> Ledger::live_buffers(std::uint32_t pid) const {
  std::vector<LiveBuffer> buffers;
  for (const auto& [id, s] : sessions_) {
    if (pid != 0 && s.identity.pid != pid) continue;
    for (const auto& [buffer, e] : s.live) {
      const auto name = s.names.find(e.mesh_buffer);
      buffers.push_back(LiveBuffer{
          .pid = s.identity.pid,
          .buffer = buffer,
          .mesh_buffer = e.mesh_buffer,
          .mesh_buffer_name = name == s.names.end() ? std::string{} : name->second.text,
          .device = e.device,
          .type = e.type,
          .address = e.address,
          .size = e.size,
          .time_ns = e.time_ns,
          .hooked = e.hooked,
      });
    }
  }
  std::ranges::sort(buffers, [](const LiveBuffer& a, const LiveBuffer& b) {
    return std::tie(a.pid, a.device, a.buffer) < std::tie(b.pid, b.device, b.buffer);
  });
  return buffers;
}

Verification Ledger::verify() const {
  Verification result;
  const auto differ = [&](std::string line) {
    result.consistent = false;
    result.differences.push_back(std::move(line));
  };
  std::map<std::uint32_t, UsageByType> device_sums_from_buffers;
  std::map<std::uint32_t, UsageByType> device_sums_from_processes;
  std::uint64_t live = 0;
  for (const auto& [id, s] : sessions_) {
    std::map<std::uint32_t, UsageByType> process_from_buffers;
    std::uint64_t bytes = 0;
    for (const auto& [buffer, e] : s.live) {
      for (auto* sums : {&process_from_buffers, &device_sums_from_buffers}) {
        Usage& u = (*sums)[e.device][index_of(e.type)];
        u.bytes += e.size;
        ++u.buffers;
      }
      bytes += e.size;
    }
    live += s.live.size();
    if (bytes != s.live_bytes) {
      differ(fmt::format("pid {}: live bytes {} but its buffers sum to {}", s.identity.pid, s.live_bytes, bytes));
    }
    for (const auto& [device, usage] : s.devices) {
      for (const BufferType type : all_buffer_types) {
        const Usage& kept = usage[index_of(type)];
        const Usage& summed = process_from_buffers[device][index_of(type)];
        if (kept.bytes != summed.bytes || kept.buffers != summed.buffers) {
          differ(fmt::format("pid {} device {} {}: process total {} bytes in {} buffers, its buffers sum to {} in {}",
                             s.identity.pid, device, to_string(type), kept.bytes, kept.buffers, summed.bytes,
                             summed.buffers));
        }
        Usage& d = device_sums_from_processes[device][index_of(type)];
        d.bytes += kept.bytes;
        d.buffers += kept.buffers;
      }
    }
  }
  if (live != active_allocations_) {
    differ(fmt::format("active allocations {} but {} buffers are live", active_allocations_, live));
  }
  for (const auto& [device, usage] : devices_) {
    for (const BufferType type : all_buffer_types) {
      const Usage& kept = usage[index_of(type)];
      const Usage& by_buffers = device_sums_from_buffers[device][index_of(type)];
      const Usage& by_processes = device_sums_from_processes[device][index_of(type)];
      if (kept.bytes != by_buffers.bytes || kept.bytes != by_processes.bytes || kept.buffers != by_buffers.buffers) {
        differ(fmt::format("device {} {}: device total {} bytes, buffers sum to {}, processes sum to {}", device,
                           to_string(type), kept.bytes, by_buffers.bytes, by_processes.bytes));
      }
    }
  }
  return result;
}

}  // namespace meshrt::server
