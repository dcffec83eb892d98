module;
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

#include <tl/expected.hpp>

module meshrt.mesh;

import meshrt.core;

namespace meshrt {

bool ProgramCache::is_enabled() const {
  const std::scoped_lock lock(mutex_);
  return enabled_;
}

void ProgramCache::enable() {
  const std::scoped_lock lock(mutex_);
  enabled_ = true;
}

void ProgramCache::disable() {
  const std::scoped_lock lock(mutex_);
  enabled_ = false;
}

void ProgramCache::clear() noexcept {
  std::map<std::string, MeshBuffer, std::less<>> cleared;
  {
    const std::scoped_lock lock(mutex_);
    cleared.swap(entries_);
  }
  // Outside the cache's lock: a Free reaches tracker callbacks, which may ask the cache.
  for (auto& [key, binaries] : cleared) binaries.deallocate();
}

ProgramCacheStatistics ProgramCache::statistics() const {
  const std::scoped_lock lock(mutex_);
  ProgramCacheStatistics statistics{.entries = entries_.size(), .hits = hits_, .misses = misses_};
  for (const auto& [key, binaries] : entries_) statistics.bytes_per_device += binaries.size_per_device();
  return statistics;
}

bool ProgramCache::contains(std::string_view key) const {
  const std::scoped_lock lock(mutex_);
  return entries_.contains(key);
}

Result<ProgramBinaries> ProgramCache::get_or_load(std::string_view key, const Loader& load) {
  {
    const std::scoped_lock lock(mutex_);
    if (auto found = entries_.find(key); enabled_ && found != entries_.end() && found->second.is_allocated()) {
      ++hits_;
      return ProgramBinaries{.address = found->second.address(),
                             .bytes_per_device = found->second.size_per_device(),
                             .cache_hit = true};
    }
    ++misses_;
  }
  // Loading allocates, and an allocation reaches the tracker's callbacks, which may ask the
  // cache: so it runs outside the cache's lock.
  auto loaded = load();
  if (!loaded) return tl::unexpected(std::move(loaded.error()));
  ProgramBinaries binaries{.address = loaded->address(), .bytes_per_device = loaded->size_per_device()};
  const std::scoped_lock lock(mutex_);
  auto found = entries_.find(key);
  if (!enabled_ || (found != entries_.end() && found->second.is_allocated())) {
    // Disabled, or another thread cached the same program meanwhile: ours serves this run alone.
    binaries.uncached = std::move(*loaded);
    return binaries;
  }
  // A stale entry (its buffer no longer allocated) is replaced; it has reported its Free already.
  entries_.insert_or_assign(std::string(key), std::move(*loaded));
  return binaries;
}

}  // namespace meshrt
