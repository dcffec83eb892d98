// meshrt.memory_map — pictures of device memory for meshrt-smi: every device's memory drawn as a
// map (SVG; banks as rows, live buffers as blocks coloured by process, free gaps visible, details
// on hover; --map), and its use over time (--timeline): a Chrome trace for Perfetto, or a page.
module;
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

export module meshrt.memory_map;

import meshrt.core;

export namespace meshrt {

// Draws the server's summary and buffer list (the JSON of meshrt-smi --json and
// --buffers --json) as a self-contained SVG document. Blocks span every bank of their type,
// because buffers are allocated in lock-step (one address in every bank); each block is
// ceil(size / banks) bytes wide, its share of each bank (page rounding not shown).
// `only_device` draws one device (a Galaxy has 32). An Error when the JSON is not what the server sends.
[[nodiscard]] Result<std::string> render_memory_map(std::string_view summary_json, std::string_view buffers_json,
                                                  std::optional<std::uint32_t> only_device = std::nullopt);

// The server's timeline (the JSON of QueryKind::timeline, ADR 0025) as a Chrome trace event file
// that Perfetto's UI and chrome://tracing open: per device, a counter per buffer type with one
// value per process, one per category, and the moments as global instant events. Timestamps are
// microseconds from the timeline's first point. An Error when the JSON is not what the server sends.
[[nodiscard]] Result<std::string> render_timeline_trace(std::string_view timeline_json);

// The same as one self-contained HTML page: per device and buffer type, used bytes over time
// stacked by process, moments marked; hovering shows each process's bytes at that time.
[[nodiscard]] Result<std::string> render_timeline_page(std::string_view timeline_json);

}  // namespace meshrt
