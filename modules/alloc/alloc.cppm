// meshrt.alloc — BankAllocator: best-fit allocation over one bank's address range.
//
// Pure: no I/O, no globals, no locking (its owner serialises access). Bad requests return an
// Error and change nothing. See ADR 0011 for the structure and its figures.
module;
#include <array>
#include <cstdint>
#include <set>
#include <tuple>
#include <vector>

#include <absl/container/flat_hash_map.h>

export module meshrt.alloc;

import meshrt.core;

export namespace meshrt {

// DRAM is allocated from the bottom of the range, L1 from the top, as on the devices we model.
enum class AllocationDirection : std::uint8_t { bottom_up, top_down };

struct AllocatorStatistics {
  std::uint64_t total_bytes{};
  std::uint64_t allocated_bytes{};
  std::uint64_t free_bytes{};
  std::uint64_t largest_free_block{};
  std::uint64_t allocated_blocks{};
  std::uint64_t free_blocks{};
  friend bool operator==(const AllocatorStatistics&, const AllocatorStatistics&) = default;
};

struct Block {
  std::uint64_t address{};
  std::uint64_t size{};
  bool allocated{};
  friend bool operator==(const Block&, const Block&) = default;
};

class BankAllocator {
 public:
  // `alignment` (a power of two) is the allocation granule: every address and size is a multiple.
  [[nodiscard]] static Result<BankAllocator> create(std::uint64_t base, std::uint64_t size, std::uint64_t alignment);

  // Best fit: a free block of the smallest size that holds `size` (rounded up to the granule);
  // among blocks of that size, the most recently freed (large blocks: the lowest address). The
  // allocation sits at the block's low end (bottom_up) or high end (top_down). `alignment` 0
  // means the granule; a larger power of two is honoured by a slower first-fit search.
  [[nodiscard]] Result<std::uint64_t> allocate(std::uint64_t size,
                                               AllocationDirection direction = AllocationDirection::bottom_up,
                                               std::uint64_t alignment = 0);
  // Frees the block that starts at `address`, coalescing it with free neighbours.
  [[nodiscard]] Result<void> free(std::uint64_t address);
  // Frees every block at once (a device closing).
  void reset();

  [[nodiscard]] AllocatorStatistics statistics() const;
  // Every block, free and allocated, in address order. O(n log n): for reports and tests.
  [[nodiscard]] std::vector<Block> block_table() const;
  [[nodiscard]] std::uint64_t base() const { return base_; }
  [[nodiscard]] std::uint64_t size() const { return size_; }
  [[nodiscard]] std::uint64_t alignment() const { return alignment_; }
  // Size of the allocated block at `address`, if there is one.
  [[nodiscard]] Result<std::uint64_t> allocated_size(std::uint64_t address) const;

  // Free blocks of up to this many granules live in exact-size buckets found through a bitmap
  // (O(1)); larger ones in an ordered set (O(log n), and there are few of them).
  static constexpr std::uint32_t bucketed_granules = 1024;

 private:
  using Index = std::uint32_t;
  static constexpr Index none = ~Index{0};
  struct Slot {
    std::uint64_t address{};
    std::uint64_t size{};
    Index previous{none};  // the physically adjacent blocks, free or not
    Index next{none};
    Index position{none};  // where it sits in its bucket, when free and bucketed
    bool allocated{false};
    bool in_use{false};
  };

  BankAllocator(std::uint64_t base, std::uint64_t size, std::uint64_t alignment);
  [[nodiscard]] Index new_slot(std::uint64_t address, std::uint64_t size);
  void drop_slot(Index index);
  void index_free(Index index);
  void unindex_free(Index index);
  [[nodiscard]] Index best_fit(std::uint64_t rounded) const;
  [[nodiscard]] Index first_fit_aligned(std::uint64_t rounded, std::uint64_t align, AllocationDirection direction) const;
  [[nodiscard]] std::uint64_t place(const Slot& block, std::uint64_t rounded, std::uint64_t align,
                                    AllocationDirection direction) const;
  Index split_off(Index index, std::uint64_t address, std::uint64_t size);
  [[nodiscard]] Error out_of_memory(std::uint64_t requested, std::uint64_t rounded) const;
  [[nodiscard]] Error not_allocated(std::uint64_t address) const;

  std::uint64_t base_{};
  std::uint64_t size_{};
  std::uint64_t alignment_{};
  std::uint64_t allocated_bytes_{};
  std::uint64_t free_blocks_{};
  std::vector<Slot> slots_;
  std::vector<Index> free_slots_;
  std::vector<std::vector<Index>> buckets_;  // [granules] -> free blocks of exactly that size
  std::array<std::uint64_t, bucketed_granules / 64 + 1> bucket_bits_{};
  std::set<std::tuple<std::uint64_t, std::uint64_t, Index>> large_;  // (size, address, slot)
  absl::flat_hash_map<std::uint64_t, Index> allocated_;               // address -> slot
};

}  // namespace meshrt
