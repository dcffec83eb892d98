// The mesh's program cache: kernel binaries of programs that ran, kept in DRAM so that the next
// run of the same program (same operation, shapes and data type) neither compiles nor loads them
// again, as tt-metal's program cache does. Every entry is a mesh buffer of category `program`, so
// each cached binary reports its Alloc when it is loaded and its Free when the cache is cleared
// or the mesh closes (ADR 0021). The MeshDevice owns its cache; meshrt.programs fills it.
module;
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

export module meshrt.mesh:program_cache;

import meshrt.core;
import :buffer;

export namespace meshrt {

// The binaries one run of a program uses: from the cache (a hit), newly loaded into it (a miss),
// or, while the cache is disabled, loaded for this run alone and freed when `uncached` goes.
struct ProgramBinaries {
  std::uint64_t address{};
  std::uint64_t bytes_per_device{};
  bool cache_hit{false};
  std::optional<MeshBuffer> uncached;
};

struct ProgramCacheStatistics {
  std::size_t entries{};
  std::uint64_t bytes_per_device{};
  std::uint64_t hits{};
  std::uint64_t misses{};
};

// Thread-safe: programs may run on one mesh from several threads.
class ProgramCache {
 public:
  using Loader = std::function<Result<MeshBuffer>()>;

  [[nodiscard]] bool is_enabled() const;
  // Later runs are cached again; what is cached stays.
  void enable();
  // Later runs load their binaries for themselves and free them after; what is cached stays
  // until clear(), as in ttnn.
  void disable();
  // Frees every cached binary (each reports its Free, reason mesh_deallocate).
  void clear() noexcept;
  [[nodiscard]] ProgramCacheStatistics statistics() const;
  [[nodiscard]] bool contains(std::string_view key) const;

  // The binaries cached under `key`, or `load`ed: kept under `key` while the cache is enabled,
  // handed back in `uncached` while it is disabled. A loader's Error is returned as it is.
  [[nodiscard]] Result<ProgramBinaries> get_or_load(std::string_view key, const Loader& load);

 private:
  mutable std::mutex mutex_;
  bool enabled_{true};
  std::uint64_t hits_{};
  std::uint64_t misses_{};
  std::map<std::string, MeshBuffer, std::less<>> entries_;
};

}  // namespace meshrt
