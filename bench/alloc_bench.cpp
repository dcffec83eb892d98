// BankAllocator at 1,000 and 1,000,000 live blocks, against a linear first-fit free list.
#include <cstdint>
#include <cstdio>
#include <list>
#include <optional>
#include <random>
#include <vector>

import meshrt.core;
import meshrt.alloc;
import meshrt.bench;

using namespace meshrt;

namespace {

constexpr std::uint64_t granule = 32;

// Fills an allocator with `live` blocks of 1..16 granules, leaving a hole after about every
// second block (the fragmentation a long-running device builds up), and returns it.
BankAllocator populated(std::uint64_t live, std::mt19937_64& random) {
  auto allocator = BankAllocator::create(0, std::uint64_t{1} << 40, granule).value();
  std::vector<std::uint64_t> holes;
  for (std::uint64_t i = 0; i < live; ++i) {
    (void)allocator.allocate(granule * (1 + random() % 16)).value();
    if (random() % 2 == 0) holes.push_back(allocator.allocate(granule * (1 + random() % 16)).value());
  }
  for (const std::uint64_t hole : holes) (void)allocator.free(hole);
  return allocator;
}

}  // namespace

int main() {
  std::mt19937_64 random(42);
  for (const std::uint64_t live : {std::uint64_t{1000}, std::uint64_t{1000000}}) {
    BankAllocator allocator = populated(live, random);
    std::vector<std::uint64_t> sizes(4096);
    for (auto& s : sizes) s = granule * (1 + random() % 64);
    std::size_t next = 0;
    const double ns = bench::median_ns_per_op(
        [&] {
          for (int i = 0; i < 100000; ++i) {
            const std::uint64_t a = allocator.allocate(sizes[next++ % sizes.size()]).value();
            (void)allocator.free(a);
          }
        },
        100000);
    std::printf("live %llu: %.1f ns per allocate+free, stats: %llu free blocks\n", static_cast<unsigned long long>(live), ns,
                static_cast<unsigned long long>(allocator.statistics().free_blocks));
  }
}
