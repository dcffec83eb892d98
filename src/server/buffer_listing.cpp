// The buffer list's JSON, written by hand a page at a time: nlohmann's DOM for a million
// buffers would cost seconds and hundreds of megabytes in one step of the event loop. Keys in
// the order nlohmann would write them, so the document reads as every other reply does.
module;
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

module meshrt.server;

import meshrt.core;
import meshrt.protocol;
import :report;

namespace meshrt::server {

void BufferListing::render(std::string& out, std::size_t max_bytes, std::int64_t now_ns) {
  if (closed_) return;
  if (quoted_names_.empty()) {
    // Names are whatever a client sent: nlohmann escapes them (invalid UTF-8 replaced).
    quoted_names_.reserve(names_.size());
    for (const std::string& name : names_) {
      quoted_names_.push_back(nlohmann::json(name).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
  }
  if (stack_json_.empty()) {
    // Per distinct stack: its call site, then (asked for) its frames, cut to fit the bound.
    stack_json_.reserve(2 * stacks_.size());
    for (const protocol::CallStack& stack : stacks_) {
      const auto dump = [](const nlohmann::json& value) {
        return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      };
      stack_json_.push_back(fmt::format(R"("call_site":{},)", dump(call_site_of(stack))));
      std::string frames;
      if (with_stacks_) {
        nlohmann::json list = report::frames_json(stack);
        frames = dump(list);
        while (frames.size() > max_stack_json_bytes - 16 && !list.empty()) {
          list.erase(list.size() - 1);
          frames = dump(list);
        }
        frames = fmt::format(R"("stack":{},)", frames);
      }
      stack_json_.push_back(std::move(frames));
    }
  }
  const std::size_t limit = out.size() + std::max(max_bytes, max_entry_bytes);
  auto sink = std::back_inserter(out);
  if (!opened_) {
    out += R"({"buffers":[)";
    opened_ = true;
  }
  while (next_ < entries_.size() && out.size() + max_entry_bytes <= limit) {
    const Entry& e = entries_[next_];
    fmt::format_to(sink,
                   R"({}{{"address":{},"age_seconds":{},"buffer":{},{}"category":"{}","device":{},"hooked":{},)"
                   R"("mesh_buffer":{},"name":{},"pid":{},"size":{},{}"type":"{}"}})",
                   next_ == 0 ? "" : ",", e.address, static_cast<double>(now_ns - e.time_ns) / 1e9, e.buffer,
                   e.stack == 0 ? "" : stack_json_[2 * std::size_t{e.stack}], to_string(e.category), e.device,
                   e.hooked, e.mesh_buffer, quoted_names_[e.name], e.pid, e.size,
                   e.stack == 0 ? "" : stack_json_[2 * std::size_t{e.stack} + 1], to_string(e.type));
    ++next_;
  }
  if (next_ == entries_.size() && out.size() + 2 <= limit) {
    out += "]}";
    closed_ = true;
  }
}

std::vector<LiveBuffer> BufferListing::buffers() const {
  std::vector<LiveBuffer> buffers;
  buffers.reserve(entries_.size());
  for (const Entry& e : entries_) {
    buffers.push_back(LiveBuffer{.pid = e.pid,
                                 .buffer = e.buffer,
                                 .mesh_buffer = e.mesh_buffer,
                                 .mesh_buffer_name = names_[e.name],
                                 .device = e.device,
                                 .type = e.type,
                                 .category = e.category,
                                 .address = e.address,
                                 .size = e.size,
                                 .time_ns = e.time_ns,
                                 .hooked = e.hooked,
                                 .stack = stacks_[e.stack].id,
                                 .call_site = call_site_of(stacks_[e.stack])});
  }
  return buffers;
}

}  // namespace meshrt::server
