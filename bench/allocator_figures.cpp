// BankAllocator at 1,000 and 1,000,000 live blocks under each policy, the fragmentation each
// leaves, and a linear first-fit free list at 100,000.
module;
#include <cstdint>
#include <list>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

module meshrt.bench;

import meshrt.core;
import meshrt.alloc;

namespace meshrt::bench {

namespace {

constexpr std::uint64_t granule = 32;
constexpr std::uint64_t pairs_per_batch = 100'000;

// Blocks of 1..16 granules with a hole after about every second one: the fragmentation a
// long-running device builds up. Requests are 1..64 granules, so some fit holes and some not.
template <class Allocator>
void populate(Allocator& allocator, std::uint64_t live, std::mt19937_64& random) {
  std::vector<std::uint64_t> holes;
  for (std::uint64_t i = 0; i < live; ++i) {
    (void)allocator.allocate(granule * (1 + random() % 16));
    if (random() % 2 == 0) {
      if (auto hole = allocator.allocate(granule * (1 + random() % 16))) holes.push_back(*hole);
    }
  }
  for (const std::uint64_t hole : holes) (void)allocator.free(hole);
}

std::vector<std::uint64_t> request_sizes(std::mt19937_64& random) {
  std::vector<std::uint64_t> sizes(4096);
  for (auto& size : sizes) size = granule * (1 + random() % 64);
  return sizes;
}

// Median ns per allocate+free pair at steady state: allocate a block, free it again.
template <class Allocator>
double pair_ns(Allocator& allocator, const std::vector<std::uint64_t>& sizes, std::uint64_t pairs, int repetitions) {
  std::size_t next = 0;
  return median_ns_per_op(
      [&] {
        for (std::uint64_t i = 0; i < pairs; ++i) {
          const auto address = allocator.allocate(sizes[next++ % sizes.size()]);
          (void)allocator.free(*address);
        }
      },
      pairs, repetitions);
}

// The classic design, kept as a baseline: one list of free blocks in address order, first fit,
// coalescing by walking the list.
class LinearFirstFit {
 public:
  explicit LinearFirstFit(std::uint64_t size) { free_.push_back({0, size}); }

  std::optional<std::uint64_t> allocate(std::uint64_t size) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < size) continue;
      const std::uint64_t address = it->first;
      it->first += size;
      it->second -= size;
      if (it->second == 0) free_.erase(it);
      allocated_.emplace_back(address, size);
      return address;
    }
    return std::nullopt;
  }

  bool free(std::uint64_t address) {
    // The live list is searched from the back: the benchmark frees what it just allocated.
    for (auto it = allocated_.rbegin(); it != allocated_.rend(); ++it) {
      if (it->first != address) continue;
      const std::uint64_t size = it->second;
      allocated_.erase(std::next(it).base());
      auto at = free_.begin();
      while (at != free_.end() && at->first < address) ++at;
      at = free_.insert(at, {address, size});
      if (const auto next = std::next(at); next != free_.end() && at->first + at->second == next->first) {
        at->second += next->second;
        free_.erase(next);
      }
      if (at != free_.begin()) {
        const auto previous = std::prev(at);
        if (previous->first + previous->second == at->first) {
          previous->second += at->second;
          free_.erase(at);
        }
      }
      return true;
    }
    return false;
  }

 private:
  std::list<std::pair<std::uint64_t, std::uint64_t>> free_;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> allocated_;
};

// Churn in a bank that stays about 80% full: random sizes of 1..64 granules, a random live block
// freed for each new one. Returns 1 - largest free block / free bytes (0: all free memory is one
// block) and the number of free blocks, at the end.
std::pair<double, double> fragmentation(AllocatorPolicy policy, std::mt19937_64& random) {
  constexpr std::uint64_t bank = std::uint64_t{64} << 20U;
  auto allocator = BankAllocator::create(0, bank, granule, policy).value();
  std::vector<std::uint64_t> live;
  std::uint64_t used = 0;
  for (int step = 0; step < 400'000; ++step) {
    const std::uint64_t size = granule * (1 + random() % 64);
    if (used + size <= bank / 10 * 8) {
      if (auto address = allocator.allocate(size)) {
        live.push_back(*address);
        used += size;
        continue;
      }
    }
    if (live.empty()) continue;
    const std::size_t victim = random() % live.size();
    used -= allocator.allocated_size(live[victim]).value();
    (void)allocator.free(live[victim]);
    live[victim] = live.back();
    live.pop_back();
  }
  const AllocatorStatistics stats = allocator.statistics();
  return {1.0 - static_cast<double>(stats.largest_free_block) / static_cast<double>(stats.free_bytes),
          static_cast<double>(stats.free_blocks)};
}

}  // namespace

std::vector<Figure> allocator_figures() {
  std::vector<Figure> figures;
  for (const AllocatorPolicy policy : {AllocatorPolicy::best_fit, AllocatorPolicy::first_fit}) {
    // The best-fit figures keep their first names (ADR 0011); first fit's carry its suffix.
    const std::string suffix = policy == AllocatorPolicy::first_fit ? "_first_fit" : "";
    std::mt19937_64 random(42);
    const auto sizes = request_sizes(random);
    double ns_1k = 0;
    double ns_1m = 0;
    for (const std::uint64_t live : {std::uint64_t{1'000}, std::uint64_t{1'000'000}}) {
      auto allocator = BankAllocator::create(0, std::uint64_t{1} << 40, granule, policy).value();
      populate(allocator, live, random);
      (live == 1'000 ? ns_1k : ns_1m) = pair_ns(allocator, sizes, pairs_per_batch, 9);
    }
    const auto [fragmented, free_blocks] = fragmentation(policy, random);
    figures.push_back(figure("alloc_ns_1k" + suffix, ns_1k, "ns"));
    figures.push_back(figure("alloc_ns_1m" + suffix, ns_1m, "ns", Bound::at_most, 250));
    figures.push_back(figure("alloc_scaling_ratio" + suffix, ns_1m / ns_1k, "x", Bound::at_most, 3));
    figures.push_back(figure("fragmentation" + suffix, fragmented, "ratio"));
    figures.push_back(figure("fragmentation_free_blocks" + suffix, free_blocks, "blocks"));
  }
  // The baseline is slow by design: fewer pairs, same median method, both at 100,000 live, both
  // first fit (the policy the baseline has).
  std::mt19937_64 random(43);
  const auto sizes = request_sizes(random);
  auto ours = BankAllocator::create(0, std::uint64_t{1} << 40, granule, AllocatorPolicy::first_fit).value();
  LinearFirstFit linear(std::uint64_t{1} << 40);
  populate(ours, 100'000, random);
  populate(linear, 100'000, random);
  const double ours_100k = pair_ns(ours, sizes, pairs_per_batch, 5);
  const double linear_100k = pair_ns(linear, sizes, 200, 5);
  figures.push_back(figure("linear_baseline_ratio_100k", linear_100k / ours_100k, "x", Bound::at_least, 100));
  return figures;
}

}  // namespace meshrt::bench
