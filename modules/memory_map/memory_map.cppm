// meshrt.memory_map — every device's memory drawn as a map (SVG): banks as rows, live buffers as
// blocks coloured by process, free gaps visible, details on hover. meshrt-smi --map uses it.
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

}  // namespace meshrt
