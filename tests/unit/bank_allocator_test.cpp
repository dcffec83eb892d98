#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

import meshrt;

using namespace meshrt;

namespace {

BankAllocator make(std::uint64_t base, std::uint64_t size, std::uint64_t alignment,
                   AllocatorPolicy policy = AllocatorPolicy::first_fit) {
  auto allocator = BankAllocator::create(base, size, alignment, policy);
  REQUIRE(allocator.has_value());
  return std::move(*allocator);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The obvious model: free blocks in an address-ordered map. It does not pick blocks itself; it
// judges the allocator's choice against the rules (best fit by size, or first fit by address;
// placement by direction).
class ReferenceAllocator {
 public:
  ReferenceAllocator(std::uint64_t base, std::uint64_t size, std::uint64_t alignment)
      : alignment_(alignment), size_(size) {
    free_[base] = size;
  }

  [[nodiscard]] std::uint64_t rounded(std::uint64_t size) const { return (size + alignment_ - 1) / alignment_ * alignment_; }

  // The size of the smallest free block that holds `size`, if any.
  [[nodiscard]] std::optional<std::uint64_t> best_fit_size(std::uint64_t size) const {
    std::optional<std::uint64_t> best;
    for (const auto& [address, block] : free_) {
      if (block >= size && (!best || block < *best)) best = block;
    }
    return best;
  }

  // The address of the first free block that holds `size`: the lowest (bottom-up) or the
  // highest (top-down).
  [[nodiscard]] std::optional<std::uint64_t> first_fit_block(std::uint64_t size, AllocationDirection direction) const {
    std::optional<std::uint64_t> first;
    for (const auto& [address, block] : free_) {
      if (block < size) continue;
      first = address;
      if (direction == AllocationDirection::bottom_up) break;
    }
    return first;
  }

  // Where an allocation aligned above the granule could go in each free block, in address order:
  // (block address, block size, placed address) for the blocks it fits.
  [[nodiscard]] std::vector<std::array<std::uint64_t, 3>> aligned_fits(std::uint64_t size, std::uint64_t align,
                                                                       AllocationDirection direction) const {
    std::vector<std::array<std::uint64_t, 3>> fits;
    for (const auto& [address, block] : free_) {
      if (block < size) continue;
      const std::uint64_t placed = direction == AllocationDirection::bottom_up
                                       ? (address + align - 1) / align * align
                                       : (address + block - size) / align * align;
      if (placed >= address && placed + size <= address + block) fits.push_back({address, block, placed});
    }
    return fits;
  }

  // The free block [address, +size) that holds `address`, if any.
  [[nodiscard]] std::optional<std::pair<std::uint64_t, std::uint64_t>> free_block_at(std::uint64_t address) const {
    auto it = free_.upper_bound(address);
    if (it == free_.begin()) return std::nullopt;
    --it;
    if (address >= it->first + it->second) return std::nullopt;
    return *it;
  }

  // Applies an allocation the allocator made; returns the size of the free block it came from,
  // or nullopt if [address, address + size) is not inside one free block.
  // With no direction the range may sit anywhere inside the block (allocate_at).
  std::optional<std::uint64_t> take(std::uint64_t address, std::uint64_t size,
                                    std::optional<AllocationDirection> direction) {
    auto it = free_.upper_bound(address);
    if (it == free_.begin()) return std::nullopt;
    --it;
    const auto [block, block_size] = *it;
    if (address + size > block + block_size) return std::nullopt;
    const bool placed = !direction || (*direction == AllocationDirection::bottom_up
                                           ? address == block
                                           : address + size == block + block_size);
    if (!placed) return std::nullopt;
    free_.erase(it);
    if (address > block) free_[block] = address - block;
    if (address + size < block + block_size) free_[address + size] = block + block_size - address - size;
    allocated_[address] = size;
    return block_size;
  }

  bool free(std::uint64_t address) {
    const auto found = allocated_.find(address);
    if (found == allocated_.end()) return false;
    std::uint64_t start = address;
    std::uint64_t size = found->second;
    allocated_.erase(found);
    if (const auto after = free_.find(start + size); after != free_.end()) {
      size += after->second;
      free_.erase(after);
    }
    if (const auto next = free_.lower_bound(start); next != free_.begin()) {
      const auto before = std::prev(next);
      if (before->first + before->second == start) {
        start = before->first;
        size += before->second;
        free_.erase(before);
      }
    }
    free_[start] = size;
    return true;
  }

  AllocatorStatistics statistics() const {
    AllocatorStatistics stats{.total_bytes = size_};
    for (const auto& [address, size] : allocated_) stats.allocated_bytes += size;
    for (const auto& [address, size] : free_) stats.largest_free_block = std::max(stats.largest_free_block, size);
    stats.free_bytes = size_ - stats.allocated_bytes;
    stats.allocated_blocks = allocated_.size();
    stats.free_blocks = free_.size();
    return stats;
  }

  std::vector<std::uint64_t> live() const {
    std::vector<std::uint64_t> addresses;
    for (const auto& [address, size] : allocated_) addresses.push_back(address);
    return addresses;
  }

 private:
  std::uint64_t alignment_;
  std::uint64_t size_;
  std::map<std::uint64_t, std::uint64_t> free_;
  std::map<std::uint64_t, std::uint64_t> allocated_;
};

}  // namespace

TEST_SUITE("alloc") {
  TEST_CASE("a new allocator is one free block covering its range") {
    const BankAllocator allocator = make(0x1000, 4096, 32);
    const AllocatorStatistics stats = allocator.statistics();
    CHECK(stats == AllocatorStatistics{4096, 0, 4096, 4096, 0, 1});
    CHECK(allocator.block_table() == std::vector<Block>{{0x1000, 4096, false}});
  }

  TEST_CASE("bad ranges are refused at creation") {
    CHECK(BankAllocator::create(0, 4096, 24).error().code == ErrorCode::invalid_argument);  // not a power of two
    CHECK(BankAllocator::create(0, 0, 32).error().code == ErrorCode::invalid_argument);
    CHECK(BankAllocator::create(16, 4096, 32).error().code == ErrorCode::invalid_argument);  // unaligned base
    CHECK(BankAllocator::create(~std::uint64_t{0} - 31, 64, 32).error().code == ErrorCode::invalid_argument);
  }

  TEST_CASE("sizes round up to the alignment and bottom-up fills from the base") {
    BankAllocator allocator = make(0, 1024, 32);
    CHECK(allocator.allocate(1).value() == 0);
    CHECK(allocator.allocate(33).value() == 32);
    CHECK(allocator.allocate(32).value() == 96);
    CHECK(allocator.statistics().allocated_bytes == 128);
  }

  TEST_CASE("top-down fills from the end of the range") {
    BankAllocator allocator = make(0, 1024, 16);
    CHECK(allocator.allocate(100, AllocationDirection::top_down).value() == 1024 - 112);
    CHECK(allocator.allocate(16, AllocationDirection::top_down).value() == 1024 - 128);
  }

  TEST_CASE("best fit picks the smallest block that holds the request") {
    BankAllocator allocator = make(0, 1024, 32, AllocatorPolicy::best_fit);
    const auto a = allocator.allocate(64).value();   // [0, 64)
    const auto b = allocator.allocate(32).value();   // [64, 96)
    const auto c = allocator.allocate(128).value();  // [96, 224)
    const auto d = allocator.allocate(32).value();   // [224, 256)
    REQUIRE(allocator.free(a).has_value());          // free 64 at 0
    REQUIRE(allocator.free(c).has_value());          // free 128 at 96; tail free 768 at 256
    CHECK(allocator.allocate(100).value() == 96);    // 128 block, not the 768 tail
    CHECK(allocator.allocate(40).value() == 0);      // 64 block
    (void)b;
    (void)d;
  }

  // tt-metal: tests/tt_metal/tt_metal/api/allocator/test_free_list_opt_allocator.cpp, FirstFit
  // (1 GiB, 1 KiB granule): with a 3 KiB hole at 1 KiB and a 1 KiB hole at 5 KiB, first fit puts
  // a 1 KiB buffer at 1 KiB; best fit takes the exact hole at 5 KiB.
  TEST_CASE("first fit takes the lowest hole that holds the request, as tt-metal's bank managers do") {
    constexpr std::uint64_t kib = 1024;
    for (const AllocatorPolicy policy : {AllocatorPolicy::first_fit, AllocatorPolicy::best_fit}) {
      CAPTURE(to_string(policy));
      BankAllocator allocator = make(0, kib * kib * kib, kib, policy);
      CHECK(allocator.allocate(1 * kib).value() == 0);
      const auto b = allocator.allocate(3 * kib).value();
      CHECK(b == 1 * kib);
      CHECK(allocator.allocate(1 * kib).value() == 4 * kib);
      const auto d = allocator.allocate(1 * kib).value();
      CHECK(d == 5 * kib);
      CHECK(allocator.allocate(1 * kib).value() == 6 * kib);
      REQUIRE(allocator.free(b).has_value());
      REQUIRE(allocator.free(d).has_value());
      CHECK(allocator.allocate(1 * kib).value() == (policy == AllocatorPolicy::first_fit ? 1 * kib : 5 * kib));
    }
  }

  // tt-metal: test_free_list_opt_allocator.cpp, AllocateAtAddressInteractions (best) and
  // FirstFitAllocateAtAddressInteractions (first): a 1 KiB wedge at 32 KiB, then a top-down
  // 1 KiB buffer lands under the wedge with best fit and at the top of the bank with first fit.
  TEST_CASE("a top-down first fit takes the highest block, best fit the smallest") {
    constexpr std::uint64_t kib = 1024;
    constexpr std::uint64_t gib = kib * kib * kib;
    for (const AllocatorPolicy policy : {AllocatorPolicy::first_fit, AllocatorPolicy::best_fit}) {
      CAPTURE(to_string(policy));
      BankAllocator allocator = make(0, gib, kib, policy);
      REQUIRE(allocator.allocate_at(32 * kib, 1 * kib).has_value());
      CHECK(allocator.allocate(1 * kib).value() == 0);
      CHECK(allocator.allocate(1 * kib, AllocationDirection::top_down).value() ==
            (policy == AllocatorPolicy::first_fit ? gib - 1 * kib : 32 * kib - 1 * kib));
      CHECK(allocator.allocate(1 * kib).value() == 1 * kib);
    }
  }

  // tt-metal: test_free_list_opt_allocator.cpp, AllocateFromTop.
  TEST_CASE("top-down and bottom-up buffers share a bank from its two ends") {
    constexpr std::uint64_t kib = 1024;
    constexpr std::uint64_t gib = kib * kib * kib;
    BankAllocator allocator = make(0, gib, kib);
    CHECK(allocator.allocate(1 * kib, AllocationDirection::top_down).value() == gib - 1 * kib);
    CHECK(allocator.allocate(1 * kib, AllocationDirection::top_down).value() == gib - 2 * kib);
    CHECK(allocator.allocate(1 * kib).value() == 0);
  }

  TEST_CASE("allocate_at takes exactly a free range and refuses one that is not free") {
    BankAllocator allocator = make(0, 4096, 32);
    CHECK(allocator.is_free(1024, 100));
    REQUIRE(allocator.allocate_at(1024, 100).has_value());  // rounds up to [1024, 1152)
    CHECK(allocator.allocated_size(1024).value() == 128);
    CHECK_FALSE(allocator.is_free(1024, 32));
    CHECK_FALSE(allocator.is_free(1000, 32));  // ends inside the block
    CHECK_FALSE(allocator.is_free(1030, 32));  // not on the granule
    const AllocatorStatistics before = allocator.statistics();
    const auto taken = allocator.allocate_at(1120, 64);
    REQUIRE_FALSE(taken.has_value());
    CHECK(taken.error().code == ErrorCode::out_of_memory);
    CHECK(contains(taken.error().message, "0x460"));
    CHECK(allocator.statistics() == before);
    CHECK(allocator.allocate_at(4096, 32).error().code == ErrorCode::out_of_memory);  // past the end
    CHECK(allocator.block_table() == std::vector<Block>{{0, 1024, false}, {1024, 128, true}, {1152, 2944, false}});
    REQUIRE(allocator.free(1024).has_value());
    CHECK(allocator.statistics() == AllocatorStatistics{4096, 0, 4096, 4096, 0, 1});
  }

  TEST_CASE("find_in_all: the first allocator's choice while all agree, else its policy over the ranges free in all") {
    for (const AllocatorPolicy policy : {AllocatorPolicy::first_fit, AllocatorPolicy::best_fit}) {
      CAPTURE(to_string(policy));
      BankAllocator one = make(0, 4096, 32, policy);
      BankAllocator two = make(0, 4096, 32, policy);
      const std::array<const BankAllocator*, 2> both{&one, &two};
      CHECK(find_in_all(both, 100, AllocationDirection::bottom_up).value() == 0);
      CHECK(find_in_all(both, 100, AllocationDirection::top_down).value() == 4096 - 128);
      // Lone allocations: `one` holds [0, 256), `two` holds [256, 512) and [3840, 4096).
      REQUIRE(one.allocate_at(0, 256).has_value());
      REQUIRE(two.allocate_at(256, 256).has_value());
      REQUIRE(two.allocate_at(3840, 256).has_value());
      CHECK(find_in_all(both, 100, AllocationDirection::bottom_up).value() == 512);
      CHECK(find_in_all(both, 100, AllocationDirection::top_down).value() == 3840 - 128);
      // Nothing of 3.5 KiB is free in both, though each has a larger free block alone.
      CHECK(one.statistics().largest_free_block == 3840);
      CHECK(two.statistics().largest_free_block == 3328);
      const auto refused = find_in_all(both, 3360, AllocationDirection::bottom_up);
      REQUIRE_FALSE(refused.has_value());
      CHECK(refused.error().code == ErrorCode::out_of_memory);
      CHECK(contains(refused.error().message, "free in all 2 of them at once"));
    }
    // Over the common ranges [128, 1024) and [1088, 1216): first fit takes the lowest, best fit
    // the smallest that holds the request.
    for (const AllocatorPolicy policy : {AllocatorPolicy::first_fit, AllocatorPolicy::best_fit}) {
      CAPTURE(to_string(policy));
      BankAllocator one = make(0, 4096, 32, policy);
      BankAllocator two = make(0, 4096, 32, policy);
      REQUIRE(one.allocate_at(0, 64).has_value());       // one: free [64, 4096)
      REQUIRE(two.allocate_at(64, 64).has_value());      // two: free [0, 64), [128, 1024), [1088, 1216)
      REQUIRE(two.allocate_at(1024, 64).has_value());
      REQUIRE(two.allocate_at(1216, 2880).has_value());
      const std::array<const BankAllocator*, 2> both{&one, &two};
      CHECK(find_in_all(both, 100, AllocationDirection::bottom_up).value() ==
            (policy == AllocatorPolicy::best_fit ? 1088 : 128));
      // The search leaves the allocators as they were.
      CHECK(one.statistics().allocated_blocks == 1);
      CHECK(two.statistics().allocated_blocks == 3);
    }
  }

  TEST_CASE("freeing coalesces with both neighbours") {
    BankAllocator allocator = make(0, 1024, 32);
    const auto a = allocator.allocate(256).value();
    const auto b = allocator.allocate(256).value();
    const auto c = allocator.allocate(256).value();
    REQUIRE(allocator.free(a).has_value());
    REQUIRE(allocator.free(c).has_value());
    CHECK(allocator.statistics().free_blocks == 2);  // [0,256) and [512,1024)
    REQUIRE(allocator.free(b).has_value());
    CHECK(allocator.statistics() == AllocatorStatistics{1024, 0, 1024, 1024, 0, 1});
  }

  TEST_CASE("a larger alignment is honoured and the padding stays free") {
    BankAllocator allocator = make(0, 4096, 32);
    REQUIRE(allocator.allocate(32).value() == 0);
    const auto aligned = allocator.allocate(64, AllocationDirection::bottom_up, 1024).value();
    CHECK(aligned == 1024);
    CHECK(allocator.statistics().allocated_bytes == 96);
    const auto padding = allocator.allocate(900).value();  // fits in the gap [32, 1024)
    CHECK(padding == 32);
  }

  TEST_CASE("bad requests return errors with the figures and change nothing") {
    BankAllocator allocator = make(0, 1024, 32);
    REQUIRE(allocator.allocate(512).has_value());
    const AllocatorStatistics before = allocator.statistics();
    const auto table_before = allocator.block_table();

    const auto zero = allocator.allocate(0);
    CHECK(zero.error().code == ErrorCode::invalid_argument);
    CHECK(contains(zero.error().message, "0 bytes"));

    const auto huge = allocator.allocate(4096);
    CHECK(huge.error().code == ErrorCode::invalid_argument);
    CHECK(contains(huge.error().message, "4096"));
    CHECK(contains(huge.error().message, "1024"));

    const auto odd = allocator.allocate(32, AllocationDirection::bottom_up, 48);
    CHECK(odd.error().code == ErrorCode::invalid_argument);
    CHECK(contains(odd.error().message, "power of two"));

    const auto full = allocator.allocate(544);
    CHECK(full.error().code == ErrorCode::out_of_memory);
    CHECK(contains(full.error().message, "requested 544 bytes"));
    CHECK(contains(full.error().message, "free 512"));
    CHECK(contains(full.error().message, "largest free block 512"));

    const auto unknown = allocator.free(0x40);
    CHECK(unknown.error().code == ErrorCode::not_found);
    const auto outside = allocator.free(0x10000);
    CHECK(outside.error().code == ErrorCode::not_found);
    CHECK(contains(outside.error().message, "outside"));

    CHECK(allocator.statistics() == before);
    CHECK(allocator.block_table() == table_before);
  }

  TEST_CASE("a double free is named as such and changes nothing") {
    BankAllocator allocator = make(0, 1024, 32);
    const auto a = allocator.allocate(64).value();
    REQUIRE(allocator.allocate(64).has_value());
    REQUIRE(allocator.free(a).has_value());
    const AllocatorStatistics before = allocator.statistics();
    const auto again = allocator.free(a);
    REQUIRE_FALSE(again.has_value());
    CHECK(again.error().code == ErrorCode::double_free);
    CHECK(allocator.statistics() == before);
  }

  TEST_CASE("out of memory when fragmented: enough free bytes, no block large enough") {
    BankAllocator allocator = make(0, 1024, 32);
    std::vector<std::uint64_t> blocks;
    for (int i = 0; i < 8; ++i) blocks.push_back(allocator.allocate(128).value());
    for (std::size_t i = 0; i < blocks.size(); i += 2) REQUIRE(allocator.free(blocks[i]).has_value());
    CHECK(allocator.statistics().free_bytes == 512);
    const auto result = allocator.allocate(256);
    REQUIRE_FALSE(result.has_value());
    CHECK(result.error().code == ErrorCode::out_of_memory);
    CHECK(contains(result.error().message, "largest free block 128"));
  }

  TEST_CASE("reset frees everything") {
    BankAllocator allocator = make(0, 1024, 32);
    for (int i = 0; i < 5; ++i) REQUIRE(allocator.allocate(100).has_value());
    allocator.reset();
    CHECK(allocator.statistics() == AllocatorStatistics{1024, 0, 1024, 1024, 0, 1});
  }

  TEST_CASE("the block table covers the range with no gaps or overlaps") {
    BankAllocator allocator = make(0x100, 4096, 64);
    std::mt19937_64 random(7);
    std::vector<std::uint64_t> live;
    for (int step = 0; step < 500; ++step) {
      if (live.empty() || random() % 3 != 0) {
        if (auto a = allocator.allocate(1 + random() % 300)) live.push_back(*a);
      } else {
        const auto at = random() % live.size();
        REQUIRE(allocator.free(live[at]).has_value());
        live.erase(live.begin() + static_cast<std::ptrdiff_t>(at));
      }
      const auto table = allocator.block_table();
      std::uint64_t cursor = 0x100;
      for (std::size_t i = 0; i < table.size(); ++i) {
        REQUIRE(table[i].address == cursor);
        if (i > 0) REQUIRE_FALSE((!table[i].allocated && !table[i - 1].allocated));  // free neighbours coalesced
        cursor += table[i].size;
      }
      REQUIRE(cursor == 0x100 + 4096);
    }
  }

  TEST_CASE("randomised: every choice follows the policy, placed by direction, and the figures match a model") {
    for (const AllocatorPolicy policy : {AllocatorPolicy::first_fit, AllocatorPolicy::best_fit}) {
      for (const std::uint64_t seed : {1ULL, 2ULL, 3ULL, 42ULL}) {
        CAPTURE(to_string(policy));
        CAPTURE(seed);
        std::mt19937_64 random(seed);
        // Small enough that both the bucketed sizes and the large ones are exercised.
        BankAllocator allocator = make(0, 1 << 18, 32, policy);
        ReferenceAllocator model(0, 1 << 18, 32);
        for (int step = 0; step < 3000; ++step) {
          CAPTURE(step);
          // Both directions in one bank, as DRAM buffers that ask for top-down do.
          const AllocationDirection direction =
              random() % 3 == 0 ? AllocationDirection::top_down : AllocationDirection::bottom_up;
          CAPTURE(to_string(direction));
          const auto live = model.live();
          if (random() % 10 == 0) {  // lock-step: a range another device's allocator chose
            const std::uint64_t address = (random() % (1 << 18)) / 32 * 32;
            const std::uint64_t size = 1 + random() % 4096;
            const auto block = model.free_block_at(address);
            const bool free = block && address + model.rounded(size) <= block->first + block->second;
            REQUIRE(allocator.is_free(address, size) == free);
            const auto taken = allocator.allocate_at(address, size);
            REQUIRE(taken.has_value() == free);
            if (free) REQUIRE(model.take(address, model.rounded(size), std::nullopt).has_value());
          } else if (random() % 10 == 0) {  // aligned above the granule: the slow search
            const std::uint64_t align = std::uint64_t{64} << (random() % 5);
            const std::uint64_t size = 1 + random() % 2048;
            const auto fits = model.aligned_fits(model.rounded(size), align, direction);
            const auto got = allocator.allocate(size, direction, align);
            REQUIRE(got.has_value() == !fits.empty());
            if (got) {
              REQUIRE(*got % align == 0);
              const auto chosen = std::ranges::find(fits, *got, [](const auto& fit) { return fit[2]; });
              REQUIRE(chosen != fits.end());
              if (policy == AllocatorPolicy::first_fit) {
                REQUIRE(*chosen == (direction == AllocationDirection::bottom_up ? fits.front() : fits.back()));
              } else {
                REQUIRE((*chosen)[1] == std::ranges::min(fits, {}, [](const auto& fit) { return fit[1]; })[1]);
              }
              REQUIRE(model.take(*got, model.rounded(size), std::nullopt).has_value());
            }
          } else if (live.empty() || random() % 5 < 3) {
            const std::uint64_t size = 1 + random() % (random() % 8 == 0 ? 65536 : 2048);
            const auto found = allocator.find(size, direction);
            const auto got = allocator.allocate(size, direction);
            const auto best = model.best_fit_size(model.rounded(size));
            const auto first = model.first_fit_block(model.rounded(size), direction);
            REQUIRE(got.has_value() == best.has_value());
            REQUIRE(found.has_value() == got.has_value());
            if (!best) {
              REQUIRE(got.error().code == ErrorCode::out_of_memory);
            } else {
              REQUIRE(*found == *got);  // find() says where allocate() puts it
              const auto block = model.free_block_at(*got);
              REQUIRE(block.has_value());
              const auto from = model.take(*got, model.rounded(size), direction);
              REQUIRE(from.has_value());  // inside one free block, at the right end of it
              if (policy == AllocatorPolicy::best_fit) REQUIRE(*from == *best);  // a best fit by size
              else REQUIRE(block->first == *first);                               // the first fit by address
            }
          } else {
            const std::uint64_t address = live[random() % live.size()];
            REQUIRE(allocator.free(address).has_value());
            REQUIRE(model.free(address));
          }
          REQUIRE(allocator.statistics() == model.statistics());
        }
      }
    }
  }

  TEST_CASE("lock-step: members share one allocator while in step, a lone allocation splits one off") {
    auto made = LockStepAllocator::create(8, 0, 1 << 20, 32);
    REQUIRE(made.has_value());
    LockStepAllocator lock_step = std::move(*made);
    const auto everywhere = lock_step.allocate(0, 8, 4096);
    REQUIRE(everywhere.has_value());
    CHECK(lock_step.members_in_step() == 8);
    // A lone allocation on member 3: only it takes the range.
    const auto lone = lock_step.allocate(3, 1, 1024);
    REQUIRE(lone.has_value());
    CHECK(*lone == 4096);
    CHECK(lock_step.members_in_step() == 7);
    CHECK(lock_step.member(3).statistics().allocated_bytes == 4096 + 1024);
    CHECK(lock_step.member(2).statistics().allocated_bytes == 4096);
    // The next lock-step allocation avoids the lone range on every member.
    const auto next = lock_step.allocate(0, 8, 4096);
    REQUIRE(next.has_value());
    CHECK(*next == 4096 + 1024);
    for (std::uint32_t member = 0; member < 8; ++member) CHECK(lock_step.member(member).is_free(4096, 1024) == (member != 3));
    // Freed, member 3 holds what the others do, and rejoins within a few of its own operations.
    REQUIRE(lock_step.free(3, 1, *lone).has_value());
    CHECK(lock_step.member(3).holds_same_blocks(lock_step.member(0)));
    for (int round = 0; round < 4 && lock_step.members_in_step() < 8; ++round) {
      const auto extra = lock_step.allocate(0, 8, 64);
      REQUIRE(extra.has_value());
      REQUIRE(lock_step.free(0, 8, *extra).has_value());
    }
    CHECK(lock_step.members_in_step() == 8);
  }

  TEST_CASE("lock-step: a mesh block freed device by device brings every device back in step") {
    LockStepAllocator lock_step = LockStepAllocator::create(8, 0, 1 << 20, 32).value();
    for (int block = 0; block < 100; ++block) REQUIRE(lock_step.allocate(0, 8, 64).has_value());
    const std::uint64_t mesh_block = lock_step.allocate(0, 8, 4096).value();
    for (std::uint32_t member = 0; member < 8; ++member) {
      REQUIRE(lock_step.free(member, 1, mesh_block).has_value());
      CHECK(lock_step.member(member).is_free(mesh_block, 4096));
      if (member + 1 < 8) {
        CHECK_FALSE(lock_step.member(member + 1).is_free(mesh_block, 4096));
        CHECK(lock_step.members_in_step() == 7 - member);
      }
    }
    // The last one freed it on the shared allocator: the others caught up and rejoined at once.
    CHECK(lock_step.members_in_step() == 8);
    // A lone block made and freed is not worth a copy each time: the member stays on its own
    // copy until its operations repaid it, then rejoins.
    const std::uint64_t lone = lock_step.allocate(2, 1, 64).value();
    REQUIRE(lock_step.free(2, 1, lone).has_value());
    CHECK(lock_step.members_in_step() == 7);
    for (int round = 0; round < 60 && lock_step.members_in_step() < 8; ++round) {
      REQUIRE(lock_step.free(2, 1, lock_step.allocate(2, 1, 64).value()).has_value());
    }
    CHECK(lock_step.members_in_step() == 8);
  }

  TEST_CASE("lock-step: refused requests and bad ranges change nothing") {
    LockStepAllocator lock_step = LockStepAllocator::create(4, 0, 4096, 32).value();
    CHECK(LockStepAllocator::create(0, 0, 4096, 32).error().code == ErrorCode::invalid_argument);
    CHECK(lock_step.allocate(2, 3, 64).error().code == ErrorCode::invalid_argument);
    CHECK(lock_step.allocate(0, 0, 64).error().code == ErrorCode::invalid_argument);
    CHECK(lock_step.allocate(1, 1, 8192).error().code == ErrorCode::invalid_argument);  // larger than the bank
    REQUIRE(lock_step.allocate(0, 4, 2048).value() == 0);
    CHECK(lock_step.allocate(1, 1, 4096).error().code == ErrorCode::out_of_memory);
    CHECK(lock_step.members_in_step() == 4);  // the refused lone request split nothing off
    const auto lone = lock_step.allocate(1, 1, 64).value();
    CHECK(lone == 2048);
    // Freeing on members that do not all hold the block: an Error (to member 0 that range is
    // free), and member 1 keeps it.
    const auto refused = lock_step.free(0, 2, lone);
    REQUIRE_FALSE(refused.has_value());
    CHECK(refused.error().code == ErrorCode::double_free);
    CHECK(lock_step.member(1).allocated_size(lone).value() == 64);
    CHECK(lock_step.free(1, 1, lone).has_value());
    CHECK(lock_step.free(1, 1, lone).error().code == ErrorCode::double_free);
  }

  TEST_CASE("lock-step, randomised: every member holds what separate allocators would") {
    for (const AllocatorPolicy policy : {AllocatorPolicy::first_fit, AllocatorPolicy::best_fit}) {
      CAPTURE(to_string(policy));
      constexpr std::uint32_t members = 6;
      LockStepAllocator lock_step = LockStepAllocator::create(members, 64, 1 << 16, 32, policy).value();
      std::vector<BankAllocator> separate;
      for (std::uint32_t member = 0; member < members; ++member) separate.push_back(make(64, 1 << 16, 32, policy));
      struct Live {
        std::uint64_t address;
        std::uint32_t first;
        std::uint32_t count;
      };
      std::vector<Live> live;
      std::mt19937_64 random(policy == AllocatorPolicy::first_fit ? 7 : 11);
      std::uint32_t fewest_in_step = members;
      for (int step = 0; step < 4000; ++step) {
        CAPTURE(step);
        const bool allocate = live.empty() || random() % 100 < 55;
        if (allocate) {
          // Mostly over every member; sometimes one member alone, sometimes a run of them.
          const std::uint64_t kind = random() % 10;
          const std::uint32_t count = kind < 6 ? members : kind < 9 ? 1 : 2 + static_cast<std::uint32_t>(random() % 3);
          const std::uint32_t first = static_cast<std::uint32_t>(random() % (members - count + 1));
          const std::uint64_t size = 1 + random() % 2048;
          const auto direction = random() % 2 == 0 ? AllocationDirection::bottom_up : AllocationDirection::top_down;
          std::vector<const BankAllocator*> range;
          for (std::uint32_t member = first; member < first + count; ++member) range.push_back(&separate[member]);
          const auto expected = find_in_all(range, size, direction);
          const auto got = lock_step.allocate(first, count, size, direction);
          REQUIRE(got.has_value() == expected.has_value());
          if (!got) continue;
          // Best fit may break ties differently once members rejoin; every answer must be free
          // on each separate allocator of the range, and the same one under first fit.
          if (policy == AllocatorPolicy::first_fit) CHECK(*got == *expected);
          for (std::uint32_t member = first; member < first + count; ++member) {
            REQUIRE(separate[member].allocate_at(*got, size).has_value());
          }
          live.push_back({*got, first, count});
        } else {
          const std::size_t pick = random() % live.size();
          Live& chosen = live[pick];
          // Sometimes one member of a lock-step allocation lets go alone.
          std::uint32_t first = chosen.first;
          std::uint32_t count = chosen.count;
          if (count > 1 && random() % 4 == 0) {
            count = 1;
            if (random() % 2 == 0) ++chosen.first;
            else first += chosen.count - 1;
            --chosen.count;
          }
          REQUIRE(lock_step.free(first, count, chosen.address).has_value());
          for (std::uint32_t member = first; member < first + count; ++member) {
            REQUIRE(separate[member].free(chosen.address).has_value());
          }
          if (count == chosen.count && first == chosen.first) live.erase(live.begin() + static_cast<std::ptrdiff_t>(pick));
        }
        fewest_in_step = std::min(fewest_in_step, lock_step.members_in_step());
        if (step % 50 == 0) {
          for (std::uint32_t member = 0; member < members; ++member) {
            CAPTURE(member);
            REQUIRE(lock_step.member(member).holds_same_blocks(separate[member]));
            CHECK(lock_step.member(member).statistics() .allocated_bytes == separate[member].statistics().allocated_bytes);
          }
        }
      }
      CHECK(fewest_in_step < members);  // members did split off
      while (!live.empty()) {
        REQUIRE(lock_step.free(live.back().first, live.back().count, live.back().address).has_value());
        live.pop_back();
      }
      for (int round = 0; round < 64 && lock_step.members_in_step() < members; ++round) {
        const auto extra = lock_step.allocate(0, members, 32).value();
        REQUIRE(lock_step.free(0, members, extra).has_value());
      }
      CHECK(lock_step.members_in_step() == members);  // all empty again: all rejoined
    }
  }
}
