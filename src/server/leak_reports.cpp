// What a session left behind, by call site (ADR 0024): the sites of a reclaim, the reports kept
// after sessions end, and the session's table of call stacks they are named from; and who holds
// a device's memory when a client runs out of it.
module;
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <absl/container/flat_hash_map.h>
#include <fmt/format.h>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;

namespace meshrt::server {

namespace {

constexpr std::size_t names_per_site = 4;

std::string describe(const protocol::StackFrame& frame) {
  std::string function = frame.function.empty() ? fmt::format("{:#x}", frame.address) : frame.function;
  if (frame.file.empty()) return function;
  if (frame.line == 0) return fmt::format("{} ({})", function, frame.file);
  return fmt::format("{} ({}:{})", function, frame.file, frame.line);
}

}  // namespace

std::string call_site_of(const protocol::CallStack& stack) {
  if (stack.frames.empty()) return {};
  return describe(stack.frames[stack.call_site < stack.frames.size() ? stack.call_site : 0]);
}

std::string LeakSite::call_site() const { return call_site_of(stack); }

std::string_view to_string(SessionEnd how) {
  switch (how) {
    case SessionEnd::goodbye: return "leaked at exit";
    case SessionEnd::gave_up: return "lost at exit";
    case SessionEnd::disconnected: return "reclaimed after a crash";
  }
  return "ended";
}

bool Ledger::add_call_stack(SessionId id, protocol::CallStack stack, std::size_t limit) {
  SessionRecord& s = session(id);
  if (const auto known = s.call_stacks.find(stack.id); known != s.call_stacks.end()) {
    known->second = std::move(stack);
    return true;
  }
  if (s.call_stacks.size() >= limit) {
    ++counters_.call_stacks_dropped;
    return false;
  }
  const std::uint32_t key = stack.id;
  s.call_stacks.emplace(key, std::move(stack));
  return true;
}

std::uint64_t Ledger::call_stack_count(SessionId id) const {
  const auto found = sessions_.find(id);
  return found == sessions_.end() ? 0 : found->second.call_stacks.size();
}

std::vector<LeakSite> Ledger::leak_sites(const SessionRecord& s, std::uint64_t& omitted) {
  // One site per call site (function, file and line): stacks that reach it by other paths count
  // with it. A stack the client never described is its own site.
  absl::flat_hash_map<std::string, std::size_t> site_of_call;
  absl::flat_hash_map<std::uint32_t, std::size_t> site_of_stack;
  std::vector<LeakSite> sites;
  for (const auto& [first, slot] : s.live) {
    const AllocationGroup& g = s.slab[slot];
    const std::uint32_t stack_id = stack_of(s, slot);
    auto by_stack = site_of_stack.find(stack_id);
    if (by_stack == site_of_stack.end()) {
      const auto known = s.call_stacks.find(stack_id);
      protocol::CallStack stack = known != s.call_stacks.end() ? known->second : protocol::CallStack{.id = stack_id};
      const std::string key = stack_id == 0 ? std::string{} : stack.frames.empty() ? fmt::format("#{}", stack_id)
                                                                                   : call_site_of(stack);
      auto [site, added] = site_of_call.try_emplace(key, sites.size());
      if (added) sites.push_back(LeakSite{.stack = std::move(stack)});
      ++sites[site->second].stacks;
      by_stack = site_of_stack.emplace(stack_id, site->second).first;
    }
    LeakSite& site = sites[by_stack->second];
    const auto live = static_cast<std::uint64_t>(std::popcount(g.live_mask));
    site.buffers += live;
    site.bytes += g.size * live;
    protocol::for_each_bit(g.live_mask, [&](std::uint32_t bit) { site.devices.push_back(g.first_device + bit); });
    if (site.names.size() < names_per_site) {
      if (const auto name = s.names.find(g.mesh_buffer); name != s.names.end() && !name->second.text.empty() &&
                                                         std::ranges::find(site.names, name->second.text) == site.names.end()) {
        site.names.push_back(name->second.text);
      }
    }
  }
  for (LeakSite& site : sites) {
    std::ranges::sort(site.devices);
    const auto [end, last] = std::ranges::unique(site.devices);
    site.devices.erase(end, last);
  }
  std::ranges::sort(sites, [](const LeakSite& a, const LeakSite& b) {
    return std::tuple(a.bytes, a.buffers, a.devices.size()) > std::tuple(b.bytes, b.buffers, b.devices.size());
  });
  omitted = 0;
  if (sites.size() > max_sites_per_report) {
    omitted = sites.size() - max_sites_per_report;
    sites.resize(max_sites_per_report);
  }
  return sites;
}

std::vector<LeakReport> Ledger::leak_reports(std::uint32_t pid) const {
  std::vector<LeakReport> reports;
  for (const LeakReport& report : leak_reports_) {
    if (pid == 0 || report.reclaim.identity.pid == pid) reports.push_back(report);
  }
  return reports;
}

std::vector<Holding> Ledger::largest_holdings(std::uint32_t device, BufferType type, std::size_t count) const {
  // Sizes first, names and call sites only for the few kept: a million live allocations cost a
  // pass over the slabs, not a million strings.
  struct Share {
    std::uint64_t bytes;
    std::uint32_t pid;
    SessionId session;
    std::uint64_t mesh_buffer;
    std::uint32_t slot;  // a group of it, for its stack
  };
  if (count == 0) return {};
  std::vector<Share> shares;
  for (const auto& [id, s] : sessions_) {
    // A mesh buffer may span several groups (several records, or devices past 64): summed by
    // id. Id 0 names no mesh buffer: each such group stands alone.
    absl::flat_hash_map<std::uint64_t, std::size_t> share_of;
    for (const auto& [first, slot] : s.live) {
      const AllocationGroup& g = s.slab[slot];
      if (g.type != type || device < g.first_device || device - g.first_device >= g.count) continue;
      if ((g.live_mask >> (device - g.first_device) & 1U) == 0) continue;
      if (g.mesh_buffer != 0) {
        auto [at, added] = share_of.try_emplace(g.mesh_buffer, shares.size());
        if (!added) {
          shares[at->second].bytes += g.size;
          continue;
        }
      }
      shares.push_back({.bytes = g.size, .pid = s.identity.pid, .session = id, .mesh_buffer = g.mesh_buffer, .slot = slot});
    }
  }
  const std::size_t kept = std::min(count, shares.size());
  std::ranges::partial_sort(shares, shares.begin() + static_cast<std::ptrdiff_t>(kept), [](const Share& a, const Share& b) {
    return std::tuple(a.bytes, b.pid, b.session, b.mesh_buffer) > std::tuple(b.bytes, a.pid, a.session, a.mesh_buffer);
  });
  std::vector<Holding> holdings;
  holdings.reserve(kept);
  for (const Share& share : std::span(shares).first(kept)) {
    const SessionRecord& s = sessions_.at(share.session);
    const auto name = s.names.find(share.mesh_buffer);
    const auto stack = s.call_stacks.find(stack_of(s, share.slot));
    holdings.push_back({.pid = share.pid,
                        .process = s.identity.name,
                        .mesh_buffer = share.mesh_buffer,
                        .mesh_buffer_name = share.mesh_buffer != 0 && name != s.names.end() ? name->second.text : std::string{},
                        .bytes = share.bytes,
                        .call_site = stack != s.call_stacks.end() ? call_site_of(stack->second) : std::string{}});
  }
  return holdings;
}

void Ledger::set_leak_report_limit(std::size_t limit) {
  leak_report_limit_ = limit;
  while (leak_reports_.size() > limit) leak_reports_.pop_front();
}

}  // namespace meshrt::server
