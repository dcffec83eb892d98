module;
#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <tl/expected.hpp>

module meshrt.memory_map;

import meshrt.core;
import :drawing;

namespace meshrt {
namespace {

using nlohmann::json;

constexpr double map_width = 960;   // pixels for one bank's address range
constexpr double left_margin = 90;  // bank labels
constexpr double panel_gap = 46;    // title and figures above each panel
constexpr std::size_t merge_above = 4000;  // blocks per panel past which neighbours of one process merge
constexpr std::string_view mixed_colour = "#7f7f7f";  // a group of tiny blocks of several processes

using drawing::bytes_text;
using drawing::escape;
using drawing::palette;

struct Block {
  std::uint64_t offset{};  // from the bank's base address
  std::uint64_t width{};   // bytes in each bank
  std::uint32_t pid{};
  std::uint64_t buffer{};
  std::uint64_t mesh_buffer{};
  std::string name;
  std::string category;  // ADR 0020; of the first buffer when the block stands for several
  std::uint64_t size{};
  std::uint32_t merged{1};  // buffers this block stands for
  std::uint32_t processes{1};  // processes among them (more than one: drawn grey)
};

struct Panel {
  std::uint32_t device{};
  std::string type;
  std::uint32_t banks{};
  std::uint64_t bank_size{};
  std::uint64_t base{};
  std::uint64_t used{};
  std::vector<Block> blocks;
};

// Largest free run in a bank, from blocks sorted by offset.
std::uint64_t largest_gap(const Panel& panel) {
  std::uint64_t largest = 0;
  std::uint64_t cursor = 0;
  for (const Block& block : panel.blocks) {
    if (block.offset > cursor) largest = std::max(largest, block.offset - cursor);
    cursor = std::max(cursor, block.offset + block.width);
  }
  return std::max(largest, panel.bank_size > cursor ? panel.bank_size - cursor : 0);
}

void merge_neighbours(Panel& panel) {
  std::vector<Block> merged;
  for (Block& block : panel.blocks) {
    if (!merged.empty() && merged.back().pid == block.pid && merged.back().category == block.category &&
        merged.back().offset + merged.back().width >= block.offset) {
      Block& last = merged.back();
      last.width = std::max(last.offset + last.width, block.offset + block.width) - last.offset;
      last.size += block.size;
      last.merged += block.merged;
      continue;
    }
    merged.push_back(std::move(block));
  }
  panel.blocks = std::move(merged);
}

// Blocks narrower than a pixel cannot be seen one by one: those that start in the same pixel
// column become one block, so a panel draws at most about two blocks per pixel column however
// many buffers it holds (a million small buffers give a map a browser can open).
void group_subpixel_blocks(Panel& panel, double scale) {
  std::vector<Block> grouped;
  std::optional<std::uint64_t> column;  // of grouped.back(), while it is a group of tiny blocks
  std::vector<std::uint32_t> pids;
  for (Block& block : panel.blocks) {
    const bool tiny = static_cast<double>(block.width) * scale < 1.0;
    const auto at = static_cast<std::uint64_t>(static_cast<double>(block.offset) * scale);
    if (tiny && column == at) {
      Block& group = grouped.back();
      group.width = std::max(group.offset + group.width, block.offset + block.width) - group.offset;
      group.size += block.size;
      group.merged += block.merged;
      if (std::ranges::find(pids, block.pid) == pids.end()) pids.push_back(block.pid);
      group.processes = static_cast<std::uint32_t>(pids.size());
      continue;
    }
    column = tiny ? std::optional(at) : std::nullopt;
    pids.assign({block.pid});
    grouped.push_back(std::move(block));
  }
  panel.blocks = std::move(grouped);
}

}  // namespace

Result<std::string> render_memory_map(std::string_view summary_json, std::string_view buffers_json,
                                      std::optional<std::uint32_t> only_device) {
  const json summary = json::parse(summary_json, nullptr, /*allow_exceptions=*/false);
  const json buffers = json::parse(buffers_json, nullptr, /*allow_exceptions=*/false);
  if (summary.is_discarded() || buffers.is_discarded() || !summary.contains("devices") ||
      !buffers.contains("buffers")) {
    return fail(ErrorCode::invalid_argument, "the server's summary or buffer list is not the JSON meshrt-smi expects");
  }
  try {
    std::map<std::pair<std::uint32_t, std::string>, Panel> panels;
    for (const json& device : summary["devices"]) {
      if (only_device && device["id"].get<std::uint32_t>() != *only_device) continue;
      for (const auto& [type, figures] : device.items()) {
        if (!figures.is_object() || !figures.contains("banks")) continue;
        const auto banks = figures["banks"].get<std::uint32_t>();
        const auto total = figures["total_bytes"].get<std::uint64_t>();
        // Unknown layout, an empty carve-out, or figures no device has: not drawn.
        if (banks == 0 || total == 0 || banks > 65536 || total / banks == 0) continue;
        panels[{device["id"].get<std::uint32_t>(), type}] =
            Panel{.device = device["id"].get<std::uint32_t>(), .type = type, .banks = banks, .bank_size = total / banks,
                  .base = figures["base_address"].get<std::uint64_t>(), .used = figures["used_bytes"].get<std::uint64_t>()};
      }
    }
    std::map<std::uint32_t, std::string> process_names;
    for (const json& process : summary["processes"]) {
      process_names[process["pid"].get<std::uint32_t>()] = process["name"].get<std::string>();
    }
    std::map<std::uint32_t, std::string_view> colours;
    for (const auto& [pid, name] : process_names) colours[pid] = palette[colours.size() % palette.size()];
    std::uint64_t unplaced = 0;
    for (const json& b : buffers["buffers"]) {
      const auto found = panels.find({b["device"].get<std::uint32_t>(), b["type"].get<std::string>()});
      if (found == panels.end()) {
        if (!only_device || b["device"].get<std::uint32_t>() == *only_device) ++unplaced;
        continue;
      }
      Panel& panel = found->second;
      const auto size = b["size"].get<std::uint64_t>();
      const auto address = b["address"].get<std::uint64_t>();
      panel.blocks.push_back(Block{.offset = address >= panel.base ? address - panel.base : 0,
                                   .width = (size + panel.banks - 1) / panel.banks,
                                   .pid = b["pid"].get<std::uint32_t>(),
                                   .buffer = b["buffer"].get<std::uint64_t>(),
                                   .mesh_buffer = b["mesh_buffer"].get<std::uint64_t>(),
                                   .name = b["name"].get<std::string>(),
                                   .category = b.value("category", std::string{"buffer"}),
                                   .size = size});
      if (!colours.contains(panel.blocks.back().pid)) {
        colours[panel.blocks.back().pid] = palette[colours.size() % palette.size()];
      }
    }

    if (only_device && panels.empty()) {
      const bool known = std::ranges::any_of(summary["devices"], [&](const json& d) { return d["id"] == *only_device; });
      return fail(ErrorCode::not_found,
                  known ? fmt::format("device {}: no client described its memory layout, so there is nothing to draw",
                                      *only_device)
                        : fmt::format("the server knows no device {}", *only_device));
    }
    std::uint64_t drawn = 0;
    for (const auto& [key, panel] : panels) drawn += panel.blocks.size();
    std::string body;
    auto out = std::back_inserter(body);
    double y = 70;
    for (auto& [key, panel] : panels) {
      std::ranges::sort(panel.blocks, {}, &Block::offset);
      const std::size_t buffer_count = panel.blocks.size();
      const std::uint64_t gap = largest_gap(panel);
      const double scale = map_width / static_cast<double>(panel.bank_size);
      if (panel.blocks.size() > merge_above) merge_neighbours(panel);
      if (panel.blocks.size() > merge_above) group_subpixel_blocks(panel, scale);
      const double row = std::clamp(160.0 / panel.banks, 2.0, 12.0);
      const double height = row * panel.banks;
      fmt::format_to(out,
                     "<text x=\"{}\" y=\"{:.1f}\" class=\"title\">Device {} · {} · {} banks × {}</text>\n"
                     "<text x=\"{}\" y=\"{:.1f}\" class=\"figures\">{} used of {} ({:.1f}%) in {} buffers · largest "
                     "free block {} per bank</text>\n",
                     left_margin, y + 16, panel.device, escape(panel.type), panel.banks, bytes_text(panel.bank_size),
                     left_margin, y + 32, bytes_text(panel.used), bytes_text(panel.bank_size * panel.banks),
                     100.0 * static_cast<double>(panel.used) / static_cast<double>(panel.bank_size * panel.banks),
                     buffer_count, bytes_text(gap));
      const double top = y + panel_gap;
      fmt::format_to(out, "<rect class=\"free\" x=\"{}\" y=\"{:.1f}\" width=\"{}\" height=\"{:.1f}\"/>\n", left_margin,
                     top, map_width, height);
      for (const Block& block : panel.blocks) {
        // Clamped to the panel: a block past the bank's end (a client's bad figures) stays visible at its edge.
        const double x = left_margin + std::min(static_cast<double>(block.offset) * scale, map_width - 1);
        const double width = std::clamp(static_cast<double>(block.width) * scale, 1.0, left_margin + map_width - x);
        const std::string who = fmt::format("pid {} ({})", block.pid,
                                            process_names.contains(block.pid) ? process_names[block.pid] : "gone");
        const std::string label =
            block.merged == 1 ? fmt::format("buffer {} ({}) · mesh buffer {}{} · {} · {} ({} per bank) at 0x{:x}",
                                            block.buffer, block.category, block.mesh_buffer,
                                            block.name.empty() ? "" : " '" + block.name + "'", who,
                                            bytes_text(block.size), bytes_text(block.width), block.offset + panel.base)
            : block.processes == 1
                ? fmt::format("{} neighbouring {} buffers of {} · {} ({} per bank) from 0x{:x}", block.merged,
                              block.category, who,
                              bytes_text(block.size), bytes_text(block.width), block.offset + panel.base)
                : fmt::format("{} small buffers of {} processes · {} ({} per bank) from 0x{:x}", block.merged,
                              block.processes, bytes_text(block.size), bytes_text(block.width),
                              block.offset + panel.base);
        const std::string_view fill = block.processes == 1 ? colours[block.pid] : mixed_colour;
        fmt::format_to(out,
                       "<rect class=\"block\" data-pid=\"{}\" data-category=\"{}\" x=\"{:.2f}\" y=\"{:.1f}\" "
                       "width=\"{:.2f}\" height=\"{:.1f}\" fill=\"{}\"><title>{}</title></rect>\n",
                       block.pid, escape(block.category), x, top, width, height, fill, escape(label));
      }
      // Bank rows: a line between banks, and a label every few banks.
      const std::uint32_t label_every = std::max<std::uint32_t>(1, static_cast<std::uint32_t>(12.0 / row));
      for (std::uint32_t bank = 0; bank < panel.banks; ++bank) {
        const double row_top = top + row * bank;
        if (bank > 0 && row >= 3) {
          fmt::format_to(out, "<line class=\"bank\" x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\"/>\n", left_margin,
                         row_top, left_margin + map_width, row_top);
        }
        if (bank % label_every == 0) {
          fmt::format_to(out, "<text x=\"{}\" y=\"{:.1f}\" class=\"bank-label\">bank {}</text>\n", left_margin - 6,
                         row_top + std::min(row, 12.0) - 1, bank);
        }
      }
      fmt::format_to(out, "<text x=\"{}\" y=\"{:.1f}\" class=\"axis\">0x{:x}</text>\n", left_margin, top + height + 12,
                     panel.base);
      fmt::format_to(out, "<text x=\"{}\" y=\"{:.1f}\" class=\"axis end\">0x{:x}</text>\n", left_margin + map_width,
                     top + height + 12, panel.base + panel.bank_size);
      y = top + height + 24;
    }

    std::string legend;
    double legend_x = left_margin;
    for (const auto& [pid, colour] : colours) {
      const std::string text = fmt::format("pid {} {}", pid, process_names.contains(pid) ? process_names[pid] : "");
      fmt::format_to(std::back_inserter(legend),
                     "<rect x=\"{:.0f}\" y=\"44\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.0f}\" y=\"54\" "
                     "class=\"legend\">{}</text>\n",
                     legend_x, colour, legend_x + 16, escape(text));
      legend_x += 24 + 7.0 * static_cast<double>(text.size());
    }
    const double width = left_margin + map_width + 20;
    std::string svg = fmt::format(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" viewBox=\"0 0 {:.0f} {:.0f}\">\n"
        "<style>\n"
        "  text {{ font-family: sans-serif; font-size: 12px; fill: #222; }}\n"
        "  .heading {{ font-size: 18px; font-weight: bold; }}\n"
        "  .title {{ font-size: 14px; font-weight: bold; }}\n"
        "  .figures, .axis {{ fill: #555; }}\n"
        "  .bank-label {{ font-size: 10px; fill: #777; text-anchor: end; }}\n"
        "  .end {{ text-anchor: end; }}\n"
        "  .free {{ fill: #eef1f4; stroke: #c5ccd3; }}\n"
        "  .bank {{ stroke: #ffffff; stroke-width: 0.5; }}\n"
        "  .block {{ stroke: #1b1b1b; stroke-width: 0.3; }}\n"
        "  .block:hover {{ stroke: #000; stroke-width: 1.5; }}\n"
        "</style>\n"
        "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
        "<text x=\"{}\" y=\"28\" class=\"heading\">meshrt memory map: {} live buffers{}</text>\n"
        "{}{}</svg>\n",
        width, y + 10, width, y + 10, left_margin, drawn + unplaced,
        unplaced > 0 ? fmt::format(" ({} on devices whose layout no client described)", unplaced) : "", legend,
        body);
    return svg;
  } catch (const json::exception& error) {
    return fail(ErrorCode::invalid_argument, fmt::format("the server's JSON is not what meshrt-smi expects: {}", error.what()));
  }
}

}  // namespace meshrt
