// meshrt.alloc — BankAllocator: best-fit allocation over one bank's address range.
//
// Pure: no I/O, no globals, no locking (its owner serialises access). Every operation is
// O(log n) in the number of free blocks; bad requests return an Error and change nothing.
module;
#include <cstdint>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

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

  // Best fit: the smallest free block that holds `size` (rounded up to the granule); among equal
  // blocks the lowest (bottom_up) or highest (top_down) address. `alignment` 0 means the granule;
  // a larger power of two is honoured at some cost in search.
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

 private:
  BankAllocator(std::uint64_t base, std::uint64_t size, std::uint64_t alignment);
  void insert_free(std::uint64_t address, std::uint64_t size);
  void erase_free(std::uint64_t address, std::uint64_t size);
  [[nodiscard]] Error out_of_memory(std::uint64_t requested, std::uint64_t rounded) const;
  [[nodiscard]] Error not_allocated(std::uint64_t address) const;

  std::uint64_t base_{};
  std::uint64_t size_{};
  std::uint64_t alignment_{};
  std::uint64_t allocated_bytes_{};
  // Free blocks three ways: by (size, address) for best fit, by start and by end so that
  // coalescing finds both neighbours in O(1) without an ordered map of addresses.
  std::set<std::pair<std::uint64_t, std::uint64_t>> free_by_size_;
  std::unordered_map<std::uint64_t, std::uint64_t> free_by_start_;  // start -> size
  std::unordered_map<std::uint64_t, std::uint64_t> free_by_end_;    // end -> start
  std::unordered_map<std::uint64_t, std::uint64_t> allocated_;      // start -> size
};

}  // namespace meshrt
