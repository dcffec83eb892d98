// meshrt.alloc — BankAllocator: first- or best-fit allocation over one bank's address range.
//
// Pure: no I/O, no globals, no locking (its owner serialises access). Bad requests return an
// Error and change nothing. See ADR 0011 for the structure and its figures.
module;
#include <array>
#include <optional>
#include <cstdint>
#include <set>
#include <span>
#include <string_view>
#include <tuple>
#include <vector>

#include <absl/container/flat_hash_map.h>

export module meshrt.alloc;

import meshrt.core;

export namespace meshrt {

// Which end of the bank a buffer grows from. tt-metal's defaults: DRAM bottom-up, L1 top-down.
enum class AllocationDirection : std::uint8_t { bottom_up, top_down };

// How a free block is chosen (ADR 0011). tt-metal's bank managers use first fit.
enum class AllocatorPolicy : std::uint8_t {
  first_fit,  // the lowest-address free block that holds the request (top-down: the highest)
  best_fit,   // the smallest free block that holds it
};

[[nodiscard]] std::string_view to_string(AllocatorPolicy policy);
[[nodiscard]] std::string_view to_string(AllocationDirection direction);

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
  [[nodiscard]] static Result<BankAllocator> create(std::uint64_t base, std::uint64_t size, std::uint64_t alignment,
                                                    AllocatorPolicy policy = AllocatorPolicy::first_fit);

  // Takes `size` bytes (rounded up to the granule) from the free block the policy chooses. First
  // fit: the lowest-address block that holds it (top_down: the highest). Best fit: the smallest
  // such block; among blocks of that size the last in its bucket, usually a recently freed one (large blocks: the lowest
  // address). The allocation sits at the block's low end (bottom_up) or high end (top_down).
  // `alignment` 0 means the granule; a larger power of two is honoured by a slower linear search.
  [[nodiscard]] Result<std::uint64_t> allocate(std::uint64_t size,
                                               AllocationDirection direction = AllocationDirection::bottom_up,
                                               std::uint64_t alignment = 0);
  // Where allocate() would place the request, without taking it.
  [[nodiscard]] Result<std::uint64_t> find(std::uint64_t size,
                                           AllocationDirection direction = AllocationDirection::bottom_up,
                                           std::uint64_t alignment = 0) const;
  // Takes exactly [address, address + size rounded up): how lock-step allocation puts a buffer at
  // the address another device's allocator chose. An Error unless the range is free.
  [[nodiscard]] Result<void> allocate_at(std::uint64_t address, std::uint64_t size);
  // True when [address, address + size rounded up) lies inside one free block.
  [[nodiscard]] bool is_free(std::uint64_t address, std::uint64_t size) const;
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
  [[nodiscard]] AllocatorPolicy policy() const { return policy_; }
  // Size of the allocated block at `address`, if there is one.
  [[nodiscard]] Result<std::uint64_t> allocated_size(std::uint64_t address) const;
  // True when both hold exactly the same allocated blocks (address and size). O(n).
  [[nodiscard]] bool holds_same_blocks(const BankAllocator& other) const;

  // Best fit: free blocks of up to this many granules live in exact-size buckets found through a
  // bitmap (O(1)); larger ones in an ordered set (O(log n), and there are few of them).
  static constexpr std::uint32_t bucketed_granules = 1024;

 private:
  using Index = std::uint32_t;
  static constexpr Index none = ~Index{0};
  struct Slot {
    std::uint64_t address{};
    std::uint64_t size{};
    std::uint64_t largest_below{};  // free tree: the largest free block in this subtree
    Index previous{none};           // the physically adjacent blocks, free or not
    Index next{none};
    Index left{none};  // free tree: a treap of free blocks by address
    Index right{none};
    Index parent{none};
    Index position{none};  // where it sits in its bucket (best fit, bucketed sizes)
    std::uint32_t priority{};
    bool allocated{false};
    bool in_use{false};
  };
  struct Choice {
    Index block{none};
    std::uint64_t address{};
  };

  BankAllocator(std::uint64_t base, std::uint64_t size, std::uint64_t alignment, AllocatorPolicy policy);
  [[nodiscard]] Result<std::uint64_t> check_request(std::uint64_t size, std::uint64_t alignment) const;
  [[nodiscard]] Choice choose(std::uint64_t rounded, AllocationDirection direction, std::uint64_t align) const;
  void take(Index block, std::uint64_t address, std::uint64_t rounded);
  [[nodiscard]] Index new_slot(std::uint64_t address, std::uint64_t size);
  void drop_slot(Index index);
  // A block joins or leaves the free indexes (tree, and buckets under best fit).
  void index_free(Index index);
  void unindex_free(Index index);
  // A free block changes address or size without passing another free block.
  void resize_free(Index index, std::uint64_t address, std::uint64_t size);
  void bucket_add(Index index);
  void bucket_remove(Index index);
  // The treap of free blocks: O(log n) expected for each operation.
  [[nodiscard]] std::uint64_t largest_in(Index tree) const;
  void refresh(Index node);
  [[nodiscard]] Index tree_insert(Index tree, Index node);
  void tree_split(Index tree, std::uint64_t address, Index& below, Index& rest);
  [[nodiscard]] Index tree_merge(Index below, Index above);
  void tree_erase(Index node);
  // Refreshes the figures from `node` up, while they change.
  void tree_update(Index node);
  void set_left(Index node, Index child);
  void set_right(Index node, Index child);
  [[nodiscard]] Index lowest_fit(std::uint64_t rounded) const;
  [[nodiscard]] Index highest_fit(std::uint64_t rounded) const;
  [[nodiscard]] Index free_block_at(std::uint64_t address) const;
  [[nodiscard]] Index best_fit(std::uint64_t rounded) const;
  [[nodiscard]] Choice aligned_fit(std::uint64_t rounded, std::uint64_t align, AllocationDirection direction) const;
  [[nodiscard]] std::uint64_t place(const Slot& block, std::uint64_t rounded, std::uint64_t align,
                                    AllocationDirection direction) const;
  [[nodiscard]] Error out_of_memory(std::uint64_t requested, std::uint64_t rounded) const;
  [[nodiscard]] Error not_allocated(std::uint64_t address) const;

  std::uint64_t base_{};
  std::uint64_t size_{};
  std::uint64_t alignment_{};
  AllocatorPolicy policy_{};
  std::uint64_t allocated_bytes_{};
  std::uint64_t free_blocks_{};
  std::uint32_t random_state_{0x9E3779B9U};  // treap priorities (xorshift)
  Index root_{none};
  std::vector<Slot> slots_;
  std::vector<Index> free_slots_;
  std::vector<std::vector<Index>> buckets_;  // [granules] -> free blocks of exactly that size
  std::array<std::uint64_t, bucketed_granules / 64 + 1> bucket_bits_{};
  std::set<std::tuple<std::uint64_t, std::uint64_t, Index>> large_;  // (size, address, slot)
  absl::flat_hash_map<std::uint64_t, Index> allocated_;               // address -> slot
};

// Lock-step allocation (ADR 0004): where `size` bytes fit at one address in every allocator given.
// The first one's own choice when that range is free in all of them; otherwise the first one's
// policy applied to the ranges free in every one (linear in their blocks, and only needed while
// lone allocations make them differ). All share base, size, granule and policy.
[[nodiscard]] Result<std::uint64_t> find_in_all(std::span<const BankAllocator* const> allocators, std::uint64_t size,
                                                AllocationDirection direction);

// The allocators of identical banks that mostly move in lock-step (the devices of a mesh, for one
// buffer type; ADR 0004): an allocation over several members takes one address on each. Members
// that hold the same blocks share one BankAllocator, so a lock-step allocation costs the same on
// 64 devices as on one. A member that comes to differ (an allocation on it alone, or a range
// freed on it alone) gets its own copy and counts how many blocks it and the shared allocator do
// not both hold. At 0 it rejoins: at once when the shared allocator caught up with it (a mesh
// buffer freed device by device), else once its own operations have repaid its O(n) copy, so
// a lone buffer made and freed again and again does not copy each time.
class LockStepAllocator {
 public:
  [[nodiscard]] static Result<LockStepAllocator> create(std::uint32_t members, std::uint64_t base, std::uint64_t size,
                                                        std::uint64_t granule,
                                                        AllocatorPolicy policy = AllocatorPolicy::first_fit);

  // One address for `size` bytes, free on every member in [first, first + count): find_in_all()
  // over their allocators (the shared one first, when a member in step is in the range).
  [[nodiscard]] Result<std::uint64_t> allocate(std::uint32_t first, std::uint32_t count, std::uint64_t size,
                                               AllocationDirection direction = AllocationDirection::bottom_up);
  // Frees the block at `address` on every member in [first, first + count). An Error, changing
  // nothing, unless each of them holds a block there.
  [[nodiscard]] Result<void> free(std::uint32_t first, std::uint32_t count, std::uint64_t address);
  // Frees everything on every member; all are in step again.
  void reset();

  [[nodiscard]] const BankAllocator& member(std::uint32_t index) const;
  [[nodiscard]] std::uint32_t members() const { return static_cast<std::uint32_t>(own_.size()); }
  // How many members share the one allocator now (for tests and benchmarks).
  [[nodiscard]] std::uint32_t members_in_step() const { return in_step_; }

 private:
  struct Own {
    std::optional<BankAllocator> allocator;  // set while the member differs from the shared one
    std::uint64_t operations{};              // its own operations since it came to differ
    std::uint64_t copy_cost{};               // the shared blocks copied then
    std::int64_t differing{};                // blocks held by it or by the shared one, not both
  };
  LockStepAllocator(BankAllocator shared, std::uint32_t members);
  [[nodiscard]] Result<void> check_range(std::uint32_t first, std::uint32_t count) const;
  // Members of the range still in step leave it, unless every member in step is in the range.
  void split_off(std::uint32_t first, std::uint32_t count);
  [[nodiscard]] std::span<BankAllocator* const> targets(std::uint32_t first, std::uint32_t count);
  void note_change(std::uint32_t first, std::uint32_t count, std::uint64_t address, std::uint64_t size,
                   bool allocated, bool shared_changed);

  BankAllocator shared_;
  std::uint32_t in_step_{};
  std::vector<Own> own_;
  std::vector<BankAllocator*> targets_;  // targets()' answer, valid during one call only
};

}  // namespace meshrt
