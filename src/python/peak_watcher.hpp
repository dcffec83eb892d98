// The peaks meshrt_limit checks: each device's bytes in use, and the most held at once above
// what was live at the last reset, per buffer type, for this process's meshes. std types only,
// so that bindings.cpp includes it before its imports.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace meshrt_python {

// Joins the process's tracker (once): call when a mesh opens, not at import, since the tracker
// is made on first use and the pytest plugin sets MESHRT_ALLOC_TRACKING after importing meshrt.
void watch_device_peaks();
void reset_device_peaks();
// {device: {"dram": bytes, "l1": bytes, ...}}
[[nodiscard]] std::map<std::uint32_t, std::map<std::string, std::uint64_t>> device_peaks();

}  // namespace meshrt_python
