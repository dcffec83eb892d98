module;
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>
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

using protocol::for_each_bit;
using protocol::group_bits;

}  // namespace

UsageByType& Ledger::usage_of(std::vector<UsageByType>& devices, std::uint32_t device) {
  Expects(device <= protocol::max_device_id);
  if (devices.size() <= device) devices.resize(std::size_t{device} + 1);
  return devices[device];
}

SessionId Ledger::open_session(SessionIdentity identity) {
  const SessionId id = next_session_++;
  sessions_[id].identity = std::move(identity);
  return id;
}

Ledger::SessionRecord& Ledger::session(SessionId id) {
  if (id == cached_id_) return *cached_;
  const auto found = sessions_.find(id);
  Expects(found != sessions_.end());
  cached_id_ = id;
  cached_ = &found->second;
  return found->second;
}

const SessionIdentity& Ledger::identity(SessionId session) const {
  const auto found = sessions_.find(session);
  Expects(found != sessions_.end());
  return found->second.identity;
}

std::uint64_t Ledger::name_count(SessionId session) const {
  const auto found = sessions_.find(session);
  return found == sessions_.end() ? 0 : found->second.names.size();
}

std::uint64_t Ledger::live_allocations(SessionId session) const {
  const auto found = sessions_.find(session);
  return found == sessions_.end() ? 0 : found->second.live_buffers;
}

Ledger::GroupIndex::iterator Ledger::find_group(SessionRecord& s, std::uint64_t buffer) {
  return protocol::find_group(s.live, buffer, [&](std::uint32_t slot) { return s.slab[slot].count; });
}

namespace {

// a + b * n without passing 2^64.
bool fits(std::uint64_t a, std::uint64_t b, std::uint64_t n = 1) {
  const std::optional<std::uint64_t> product = checked_multiply(b, n);
  return product && a <= std::numeric_limits<std::uint64_t>::max() - *product;
}

}  // namespace

bool Ledger::add(SessionRecord& s, const protocol::AllocRecord& record) {
  // Every total the record adds to must stay below 2^64: checked before anything changes.
  bool fit = fits(s.live_bytes, record.size, record.device_count);
  const std::size_t type = index_of(record.type);
  for (std::uint32_t device = record.device; fit && device < record.device + record.device_count; ++device) {
    fit = (device >= devices_.size() || fits(devices_[device][type].bytes, record.size)) &&
          (device >= s.devices.size() || fits(s.devices[device][type].bytes, record.size));
  }
  if (!fit) {
    counters_.refused_allocations += record.device_count;
    return false;
  }
  const auto [group, inserted] = s.live.try_emplace(record.buffer, 0);
  if (!inserted) {
    counters_.duplicate_allocations += record.device_count;
    return true;
  }
  static_assert(protocol::max_devices_per_record <= std::numeric_limits<std::uint8_t>::max());
  static_assert(sizeof(AllocationGroup) == 48, "a live allocation's record stays 48 bytes (ADR 0012, 0020)");
  const AllocationGroup value{.mesh_buffer = record.mesh_buffer,
                              .address = record.address,
                              .size = record.size,
                              .time_ns = record.time_ns,
                              .live_mask = group_bits(0, record.device_count),
                              .first_device = record.device,
                              .count = static_cast<std::uint8_t>(record.device_count),
                              .category = record.category,
                              .type = record.type,
                              .hooked = record.hooked};
  const std::size_t category = index_of(record.category);
  if (s.free_slots.empty()) {
    group->second = static_cast<std::uint32_t>(s.slab.size());
    s.slab.push_back(value);
  } else {
    group->second = s.free_slots.back();
    s.free_slots.pop_back();
    s.slab[group->second] = value;
  }
  if (record.stack != 0 || !s.stacks.empty()) {
    if (s.stacks.size() < s.slab.size()) s.stacks.resize(s.slab.size());
    s.stacks[group->second] = record.stack;
  }
  for (std::uint32_t device = record.device; device < record.device + record.device_count; ++device) {
    grow(usage_of(devices_, device)[type], record.size);
    if (device_categories_.size() <= device) device_categories_.resize(std::size_t{device} + 1);
    grow(device_categories_[device][type][category], record.size);
    grow(usage_of(s.devices, device)[type], record.size);
    if (device_known_.size() <= device) device_known_.resize(std::size_t{device} + 1);
    device_known_[device] = true;
  }
  s.live_buffers += record.device_count;
  s.live_bytes += record.size * record.device_count;
  active_allocations_ += record.device_count;
  if (const auto name = s.names.find(record.mesh_buffer); name != s.names.end()) ++name->second.live;
  return true;
}

void Ledger::remove(SessionRecord& s, GroupIndex::iterator group, std::uint64_t mask) {
  AllocationGroup& g = s.slab[group->second];
  const std::size_t type = index_of(g.type);
  const std::size_t category = index_of(g.category);
  const auto freed = static_cast<std::uint64_t>(std::popcount(mask));
  for_each_bit(mask, [&](std::uint32_t bit) {
    shrink(devices_[g.first_device + bit][type], g.size);
    shrink(device_categories_[g.first_device + bit][type][category], g.size);
    shrink(s.devices[g.first_device + bit][type], g.size);
  });
  s.live_buffers -= freed;
  s.live_bytes -= g.size * freed;
  active_allocations_ -= freed;
  g.live_mask &= ~mask;
  if (g.live_mask != 0) return;
  if (const auto name = s.names.find(g.mesh_buffer); name != s.names.end() && --name->second.live == 0) {
    s.names.erase(name);
  }
  s.free_slots.push_back(group->second);
  s.live.erase(group);
}

void Ledger::remove_all(SessionRecord& s) {
  for (auto group = s.live.begin(); group != s.live.end();) {
    const auto next = std::next(group);  // erasing one element leaves the others' iterators valid
    remove(s, group, s.slab[group->second].live_mask);
    group = next;
  }
}

void Ledger::remember_free(SessionRecord& s, std::uint64_t first_id) {
  if (!s.recent_frees.insert(first_id).second) return;
  if (s.recent_free_ring.size() < recent_frees_remembered) {
    s.recent_free_ring.push_back(first_id);
    return;
  }
  s.recent_frees.erase(s.recent_free_ring[s.recent_free_next]);
  s.recent_free_ring[s.recent_free_next] = first_id;
  s.recent_free_next = (s.recent_free_next + 1) % recent_frees_remembered;
}

bool Ledger::check_sequence(SessionId id, std::uint64_t first_sequence, std::uint64_t count) {
  SessionRecord& s = session(id);
  const bool in_order = first_sequence == s.next_sequence;
  if (!in_order) ++counters_.sequence_gaps;
  s.next_sequence = first_sequence + count;
  return in_order;
}

bool Ledger::apply_alloc(SessionId id, const protocol::AllocRecord& record) {
  SessionRecord& s = session(id);
  if (!add(s, record)) return false;
  counters_.allocations += record.device_count;
  s.allocations += record.device_count;
  return true;
}

FreeOutcome Ledger::apply_free(SessionId id, const protocol::FreeRecord& record) {
  SessionRecord& s = session(id);
  const auto group = find_group(s, record.buffer);
  if (group == s.live.end()) {
    FreeOutcome outcome;
    (s.recent_frees.contains(record.buffer) ? outcome.double_frees : outcome.unknown_frees) = record.device_count;
    counters_.double_deallocations += outcome.double_frees;
    counters_.unknown_deallocations += outcome.unknown_frees;
    return outcome;
  }
  const AllocationGroup& g = s.slab[group->second];
  const std::uint64_t offset = record.buffer - group->first;
  const std::uint64_t named = group_bits(offset, record.device_count) & group_bits(0, g.count);
  const std::uint64_t freed = named & g.live_mask;
  FreeOutcome outcome{.freed_mask = freed,
                      .first_device = g.first_device,
                      .type = g.type,
                      .category = g.category,
                      .size = g.size,
                      .double_frees = static_cast<std::uint64_t>(std::popcount(named & ~freed)),
                      .unknown_frees = record.device_count - static_cast<std::uint64_t>(std::popcount(named))};
  counters_.double_deallocations += outcome.double_frees;
  counters_.unknown_deallocations += outcome.unknown_frees;
  const auto count = static_cast<std::uint64_t>(std::popcount(freed));
  counters_.deallocations += count;
  s.deallocations += count;
  const std::uint64_t first = group->first;
  const bool last = (g.live_mask & ~freed) == 0;
  remove(s, group, freed);
  if (last) remember_free(s, first);
  return outcome;
}

void Ledger::name_mesh_buffer(SessionId id, std::uint64_t mesh_buffer, std::string name) {
  session(id).names[mesh_buffer].text = std::move(name);
}

void Ledger::set_device_totals(SessionId id, const protocol::DeviceTotals& totals) {
  Expects(totals.device <= protocol::max_device_id);
  SessionRecord& s = session(id);
  if (device_totals_.size() <= totals.device) {
    device_totals_.resize(std::size_t{totals.device} + 1);
    device_reporters_.resize(std::size_t{totals.device} + 1);
  }
  const bool vouched = std::ranges::find(s.described_devices, totals.device) != s.described_devices.end();
  protocol::DeviceTotals& kept = device_totals_[totals.device];
  const bool agrees = kept.total_bytes == totals.total_bytes && kept.bank_count == totals.bank_count &&
                      kept.base_address == totals.base_address;
  std::uint32_t& reporters = device_reporters_[totals.device];
  if (vouched && reporters == 1) {
    kept = totals;  // the only voice for this device may correct itself (a new mesh of another spec)
  } else if (vouched) {
    if (!agrees) ++counters_.conflicting_device_info;
    return;
  } else if (reporters == 0 || agrees) {
    kept = totals;
    ++reporters;
    s.described_devices.push_back(totals.device);
  } else {
    ++counters_.conflicting_device_info;
    return;
  }
  (void)usage_of(devices_, totals.device);
  if (device_known_.size() <= totals.device) device_known_.resize(std::size_t{totals.device} + 1);
  device_known_[totals.device] = true;  // a known device shows up even while empty
}

void Ledger::begin_snapshot(SessionId id) {
  SessionRecord& s = session(id);
  remove_all(s);
  s.slab.clear();
  s.free_slots.clear();
  s.stacks.clear();
  s.recent_frees.clear();
  s.recent_free_ring.clear();
  s.recent_free_next = 0;
}

bool Ledger::apply_snapshot_record(SessionId id, const protocol::AllocRecord& record) { return add(session(id), record); }

void Ledger::end_snapshot(SessionId id, std::uint64_t next_sequence) {
  session(id).next_sequence = next_sequence;
  ++counters_.resyncs;
}

Reclaim Ledger::close_session(SessionId id, SessionEnd how, std::int64_t ended_ns) {
  SessionRecord& s = session(id);
  Reclaim reclaim{.identity = s.identity, .buffers = s.live_buffers, .bytes = s.live_bytes};
  if (s.live_buffers > 0) reclaim.sites = leak_sites(s, reclaim.sites_omitted);
  for (std::uint32_t device = 0; device < s.devices.size(); ++device) {
    const UsageByType& usage = s.devices[device];
    if (std::ranges::any_of(usage, [](const Usage& u) { return u.buffers > 0; })) reclaim.devices[device] = usage;
  }
  switch (how) {
    case SessionEnd::goodbye: counters_.leaked_at_exit += s.live_buffers; break;
    case SessionEnd::gave_up: counters_.lost_at_exit += s.live_buffers; break;
    case SessionEnd::disconnected: counters_.reclaimed_allocations += s.live_buffers; break;
  }
  for (const std::uint32_t device : s.described_devices) --device_reporters_[device];
  remove_all(s);
  if (cached_id_ == id) {
    cached_id_ = 0;
    cached_ = nullptr;
  }
  sessions_.erase(id);
  if (reclaim.buffers > 0 && leak_report_limit_ > 0) {
    if (leak_reports_.size() == leak_report_limit_) leak_reports_.pop_front();
    leak_reports_.push_back(LeakReport{.session = id, .how = how, .ended_ns = ended_ns, .reclaim = reclaim});
  }
  return reclaim;
}

Summary Ledger::summary() const {
  Summary summary{.active_allocations = active_allocations_, .counters = counters_};
  for (std::uint32_t device = 0; device < device_known_.size(); ++device) {
    if (!device_known_[device]) continue;
    DeviceSummary d{.device = device,
                    .usage = device < devices_.size() ? devices_[device] : UsageByType{},
                    .categories = device < device_categories_.size() ? device_categories_[device] : UsageByCategory{}};
    if (device < device_totals_.size()) {
      d.total_bytes = device_totals_[device].total_bytes;
      d.bank_count = device_totals_[device].bank_count;
      d.base_address = device_totals_[device].base_address;
    }
    summary.devices.push_back(d);
  }
  summary.processes.reserve(sessions_.size());
  for (const auto& [id, s] : sessions_) {
    ProcessSummary process{.session = id,
                           .identity = s.identity,
                           .live_allocations = s.live_buffers,
                           .live_bytes = s.live_bytes,
                           .allocations = s.allocations,
                           .deallocations = s.deallocations};
    for (std::uint32_t device = 0; device < s.devices.size(); ++device) {
      if (std::ranges::any_of(s.devices[device], [](const Usage& u) { return u.peak_bytes > 0; })) {
        process.devices[device] = s.devices[device];
      }
    }
    summary.processes.push_back(std::move(process));
  }
  return summary;
}

BufferListing Ledger::list_buffers(std::uint32_t pid, bool with_stacks) const {
  BufferListing listing;
  listing.with_stacks_ = with_stacks;
  std::size_t count = 0;
  for (const auto& [id, s] : sessions_) {
    if (pid == 0 || s.identity.pid == pid) count += s.live_buffers;
  }
  listing.entries_.reserve(count);
  absl::flat_hash_map<std::uint64_t, std::uint32_t> name_index;  // this session's mesh buffer -> names_
  absl::flat_hash_map<std::uint32_t, std::uint32_t> stack_index;  // this session's stack id -> stacks_
  for (const auto& [id, s] : sessions_) {
    if (pid != 0 && s.identity.pid != pid) continue;
    name_index.clear();
    stack_index.clear();
    for (const auto& [first, slot] : s.live) {
      const AllocationGroup& g = s.slab[slot];
      std::uint32_t name = 0;
      if (const auto known = s.names.find(g.mesh_buffer); known != s.names.end() && !known->second.text.empty()) {
        const auto [at, added] = name_index.try_emplace(g.mesh_buffer, static_cast<std::uint32_t>(listing.names_.size()));
        if (added) listing.names_.push_back(known->second.text);
        name = at->second;
      }
      std::uint32_t stack = 0;
      if (const std::uint32_t stack_id = stack_of(s, slot); stack_id != 0) {
        const auto [at, added] = stack_index.try_emplace(stack_id, static_cast<std::uint32_t>(listing.stacks_.size()));
        if (added) {
          const auto known = s.call_stacks.find(stack_id);
          listing.stacks_.push_back(known != s.call_stacks.end() ? known->second : protocol::CallStack{.id = stack_id});
        }
        stack = at->second;
      }
      for_each_bit(g.live_mask, [&](std::uint32_t bit) {
        listing.entries_.push_back(BufferListing::Entry{.buffer = first + bit,
                                                        .mesh_buffer = g.mesh_buffer,
                                                        .address = g.address,
                                                        .size = g.size,
                                                        .time_ns = g.time_ns,
                                                        .pid = s.identity.pid,
                                                        .device = g.first_device + bit,
                                                        .name = name,
                                                        .stack = stack,
                                                        .type = g.type,
                                                        .category = g.category,
                                                        .hooked = g.hooked});
      });
    }
  }
  std::ranges::sort(listing.entries_, [](const BufferListing::Entry& a, const BufferListing::Entry& b) {
    return std::tie(a.pid, a.device, a.buffer) < std::tie(b.pid, b.device, b.buffer);
  });
  return listing;
}

}  // namespace meshrt::server
