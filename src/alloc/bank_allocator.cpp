module;
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <limits>
#include <set>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <absl/container/flat_hash_map.h>
#include <fmt/format.h>
#include <gsl/gsl>
#include <tl/expected.hpp>

module meshrt.alloc;

import meshrt.core;

namespace meshrt {

namespace {

constexpr std::uint64_t round_up(std::uint64_t value, std::uint64_t alignment) {
  return (value + alignment - 1) & ~(alignment - 1);
}

constexpr std::uint64_t round_down(std::uint64_t value, std::uint64_t alignment) { return value & ~(alignment - 1); }

}  // namespace

std::string_view to_string(AllocatorPolicy policy) {
  return policy == AllocatorPolicy::first_fit ? "first_fit" : "best_fit";
}

std::string_view to_string(AllocationDirection direction) {
  return direction == AllocationDirection::bottom_up ? "bottom_up" : "top_down";
}

Result<BankAllocator> BankAllocator::create(std::uint64_t base, std::uint64_t size, std::uint64_t alignment,
                                            AllocatorPolicy policy) {
  if (alignment == 0 || !std::has_single_bit(alignment)) {
    return fail(ErrorCode::invalid_argument, fmt::format("allocator alignment {} is not a power of two", alignment));
  }
  if (size == 0 || size % alignment != 0 || base % alignment != 0) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("allocator range [{:#x}, +{}) must be non-empty and aligned to {} bytes", base, size,
                            alignment));
  }
  if (base > std::numeric_limits<std::uint64_t>::max() - size) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("allocator range [{:#x}, +{}) passes the end of a 64-bit address space", base, size));
  }
  if (policy != AllocatorPolicy::first_fit && policy != AllocatorPolicy::best_fit) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("allocator policy {} is not first_fit or best_fit", static_cast<int>(policy)));
  }
  return BankAllocator(base, size, alignment, policy);
}

BankAllocator::BankAllocator(std::uint64_t base, std::uint64_t size, std::uint64_t alignment, AllocatorPolicy policy)
    : base_(base), size_(size), alignment_(alignment), policy_(policy) {
  index_free(new_slot(base_, size_));
}

BankAllocator::Index BankAllocator::new_slot(std::uint64_t address, std::uint64_t size) {
  Index index = 0;
  if (!free_slots_.empty()) {
    index = free_slots_.back();
    free_slots_.pop_back();
  } else {
    index = static_cast<Index>(slots_.size());
    slots_.emplace_back();
  }
  slots_[index] = Slot{.address = address, .size = size, .in_use = true};
  return index;
}

void BankAllocator::drop_slot(Index index) {
  slots_[index].in_use = false;
  free_slots_.push_back(index);
}

// ---- best fit's buckets ----

void BankAllocator::bucket_add(Index index) {
  if (policy_ != AllocatorPolicy::best_fit) return;
  Slot& block = slots_[index];
  const std::uint64_t granules = block.size / alignment_;
  if (granules > bucketed_granules) {
    large_.emplace(block.size, block.address, index);
    return;
  }
  // Made with the first small free block: a new (or copied) allocator holds one large block.
  if (buckets_.empty()) buckets_.resize(bucketed_granules + 1);
  auto& bucket = buckets_[granules];
  block.position = static_cast<Index>(bucket.size());
  bucket.push_back(index);
  bucket_bits_[granules / 64] |= std::uint64_t{1} << (granules % 64);
}

void BankAllocator::bucket_remove(Index index) {
  if (policy_ != AllocatorPolicy::best_fit) return;
  const Slot& block = slots_[index];
  const std::uint64_t granules = block.size / alignment_;
  if (granules > bucketed_granules) {
    large_.erase({block.size, block.address, index});
    return;
  }
  auto& bucket = buckets_[granules];
  const Index moved = bucket.back();
  bucket[block.position] = moved;
  slots_[moved].position = block.position;
  bucket.pop_back();
  if (bucket.empty()) bucket_bits_[granules / 64] &= ~(std::uint64_t{1} << (granules % 64));
}

void BankAllocator::index_free(Index index) {
  Slot& block = slots_[index];
  block.allocated = false;
  block.left = block.right = block.parent = none;
  random_state_ ^= random_state_ << 13U;
  random_state_ ^= random_state_ >> 17U;
  random_state_ ^= random_state_ << 5U;
  block.priority = random_state_;
  block.largest_below = block.size;
  ++free_blocks_;
  root_ = tree_insert(root_, index);
  slots_[root_].parent = none;
  bucket_add(index);
}

void BankAllocator::unindex_free(Index index) {
  --free_blocks_;
  bucket_remove(index);
  tree_erase(index);
}

void BankAllocator::resize_free(Index index, std::uint64_t address, std::uint64_t size) {
  bucket_remove(index);
  slots_[index].address = address;
  slots_[index].size = size;
  tree_update(index);
  bucket_add(index);
}

// The smallest non-empty bucket at or above the request (a scan of at most 17 bitmap words),
// else the smallest large block that holds it.
BankAllocator::Index BankAllocator::best_fit(std::uint64_t rounded) const {
  const std::uint64_t granules = rounded / alignment_;
  if (granules <= bucketed_granules) {
    std::size_t word = granules / 64;
    std::uint64_t bits = bucket_bits_[word] & (~std::uint64_t{0} << (granules % 64));
    while (bits == 0 && ++word < bucket_bits_.size()) bits = bucket_bits_[word];
    if (bits != 0) {
      const std::size_t bucket = word * 64 + static_cast<std::size_t>(std::countr_zero(bits));
      return buckets_[bucket].back();  // usually a recently freed one: warm in cache
    }
  }
  const auto found = large_.lower_bound({rounded, 0, 0});
  return found == large_.end() ? none : std::get<2>(*found);
}

std::uint64_t BankAllocator::place(const Slot& block, std::uint64_t rounded, std::uint64_t align,
                                   AllocationDirection direction) const {
  return direction == AllocationDirection::bottom_up ? round_up(block.address, align)
                                                     : round_down(block.address + block.size - rounded, align);
}

// With an alignment above the granule a block may need padding. Best fit: the first block, from
// the smallest size up, that holds the request once aligned; first fit: the first in address
// order (from the top, top-down). Rare, and linear in the worst case.
BankAllocator::Choice BankAllocator::aligned_fit(std::uint64_t rounded, std::uint64_t align,
                                                 AllocationDirection direction) const {
  const auto fits = [&](Index index) {
    const Slot& block = slots_[index];
    if (block.size < rounded) return false;
    const std::uint64_t address = place(block, rounded, align, direction);
    return address >= block.address && address - block.address <= block.size - rounded;
  };
  const auto chosen = [&](Index index) { return Choice{index, place(slots_[index], rounded, align, direction)}; };
  if (policy_ == AllocatorPolicy::best_fit) {
    for (std::uint64_t granules = rounded / alignment_; granules < buckets_.size(); ++granules) {
      for (const Index index : buckets_[granules]) {
        if (fits(index)) return chosen(index);
      }
    }
    for (auto it = large_.lower_bound({rounded, 0, 0}); it != large_.end(); ++it) {
      if (fits(std::get<2>(*it))) return chosen(std::get<2>(*it));
    }
    return {};
  }
  // In-order walk of the free tree (from the top, top-down), skipping subtrees too small to
  // hold the request.
  const bool upward = direction == AllocationDirection::bottom_up;
  const auto walk = [&](const auto& self, Index at) -> Index {
    if (at == none || largest_in(at) < rounded) return none;
    const Slot& slot = slots_[at];
    if (const Index found = self(self, upward ? slot.left : slot.right); found != none) return found;
    if (fits(at)) return at;
    return self(self, upward ? slot.right : slot.left);
  };
  const Index found = walk(walk, root_);
  return found == none ? Choice{} : chosen(found);
}

Result<std::uint64_t> BankAllocator::check_request(std::uint64_t size, std::uint64_t alignment) const {
  if (size == 0) {
    return fail(ErrorCode::invalid_argument, "allocation of 0 bytes: a buffer needs at least one byte");
  }
  if (alignment != 0 && !std::has_single_bit(alignment)) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("alignment {} is not a power of two (requested {} bytes)", alignment, size));
  }
  if (size > size_) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("requested {} bytes, larger than the whole bank of {} bytes", size, size_));
  }
  return round_up(size, alignment_);
}

BankAllocator::Choice BankAllocator::choose(std::uint64_t rounded, AllocationDirection direction,
                                            std::uint64_t align) const {
  if (align != alignment_) return aligned_fit(rounded, align, direction);
  Index block = none;
  if (policy_ == AllocatorPolicy::best_fit) block = best_fit(rounded);
  else block = direction == AllocationDirection::bottom_up ? lowest_fit(rounded) : highest_fit(rounded);
  if (block == none) return {};
  return Choice{block, place(slots_[block], rounded, align, direction)};
}

// Cuts [address, address + rounded) out of the free block `index`. What is left on either side
// stays free; the piece below keeps the block's slot (and its place in the free tree), so the
// common cases change the tree in place.
void BankAllocator::take(Index index, std::uint64_t address, std::uint64_t rounded) {
  const Slot block = slots_[index];
  const std::uint64_t below = address - block.address;
  const std::uint64_t above = block.address + block.size - address - rounded;
  Index taken = index;
  if (below == 0 && above == 0) {
    unindex_free(index);
  } else {
    taken = new_slot(address, rounded);
    if (below == 0) {  // the remainder above keeps the slot, moved up past the cut
      slots_[taken].previous = block.previous;
      slots_[taken].next = index;
      if (block.previous != none) slots_[block.previous].next = taken;
      slots_[index].previous = taken;
      resize_free(index, address + rounded, above);
    } else {
      slots_[taken].previous = index;
      slots_[taken].next = block.next;
      if (block.next != none) slots_[block.next].previous = taken;
      slots_[index].next = taken;
      resize_free(index, block.address, below);
      if (above != 0) {
        const Index rest = new_slot(address + rounded, above);
        slots_[rest].previous = taken;
        slots_[rest].next = block.next;
        if (block.next != none) slots_[block.next].previous = rest;
        slots_[taken].next = rest;
        index_free(rest);
      }
    }
  }
  slots_[taken].allocated = true;
  allocated_.emplace(address, taken);
  allocated_bytes_ += rounded;
}

Result<std::uint64_t> BankAllocator::find(std::uint64_t size, AllocationDirection direction,
                                          std::uint64_t alignment) const {
  auto rounded = check_request(size, alignment);
  if (!rounded) return rounded;
  const Choice choice = choose(*rounded, direction, std::max(alignment, alignment_));
  if (choice.block == none) return tl::unexpected(out_of_memory(size, *rounded));
  return choice.address;
}

Result<std::uint64_t> BankAllocator::allocate(std::uint64_t size, AllocationDirection direction,
                                              std::uint64_t alignment) {
  auto rounded = check_request(size, alignment);
  if (!rounded) return rounded;
  const Choice choice = choose(*rounded, direction, std::max(alignment, alignment_));
  if (choice.block == none) return tl::unexpected(out_of_memory(size, *rounded));
  take(choice.block, choice.address, *rounded);
  return choice.address;
}

bool BankAllocator::is_free(std::uint64_t address, std::uint64_t size) const {
  if (size == 0 || size > size_ || address % alignment_ != 0) return false;
  const std::uint64_t rounded = round_up(size, alignment_);
  const Index block = free_block_at(address);
  if (block == none) return false;
  const std::uint64_t end = slots_[block].address + slots_[block].size;  // no overflow: create() checked
  return rounded <= end - address;
}

Result<void> BankAllocator::allocate_at(std::uint64_t address, std::uint64_t size) {
  auto rounded = check_request(size, 0);
  if (!rounded) return tl::unexpected(std::move(rounded.error()));
  if (!is_free(address, size)) {
    return fail(ErrorCode::out_of_memory,
                fmt::format("[{:#x}, +{}) is not free in the bank [{:#x}, {:#x})", address, *rounded, base_,
                            base_ + size_));
  }
  take(free_block_at(address), address, *rounded);
  return {};
}

Result<void> BankAllocator::free(std::uint64_t address) {
  const auto found = allocated_.find(address);
  if (found == allocated_.end()) return tl::unexpected(not_allocated(address));
  const Index index = found->second;
  allocated_.erase(found);
  const Slot block = slots_[index];
  allocated_bytes_ -= block.size;

  // Coalesce: a free neighbour absorbs this block (in place in the free tree); with free
  // neighbours on both sides the one below absorbs both.
  const bool free_below = block.previous != none && !slots_[block.previous].allocated;
  const bool free_above = block.next != none && !slots_[block.next].allocated;
  const auto unlink = [this](Index gone) {
    const Slot slot = slots_[gone];
    if (slot.previous != none) slots_[slot.previous].next = slot.next;
    if (slot.next != none) slots_[slot.next].previous = slot.previous;
    drop_slot(gone);
  };
  if (free_below && free_above) {
    const Index below = block.previous;
    const Index above = block.next;
    const std::uint64_t merged = slots_[below].size + block.size + slots_[above].size;
    unindex_free(above);
    unlink(above);
    unlink(index);
    resize_free(below, slots_[below].address, merged);
  } else if (free_below) {
    const Index below = block.previous;
    unlink(index);
    resize_free(below, slots_[below].address, slots_[below].size + block.size);
  } else if (free_above) {
    const Index above = block.next;
    unlink(index);
    resize_free(above, block.address, slots_[above].size + block.size);
  } else {
    index_free(index);
  }
  return {};
}

void BankAllocator::reset() {
  slots_.clear();
  free_slots_.clear();
  for (auto& bucket : buckets_) bucket.clear();
  bucket_bits_.fill(0);
  large_.clear();
  allocated_.clear();
  allocated_bytes_ = 0;
  free_blocks_ = 0;
  root_ = none;
  index_free(new_slot(base_, size_));
}

AllocatorStatistics BankAllocator::statistics() const {
  const std::uint64_t largest = largest_in(root_);
  return AllocatorStatistics{
      .total_bytes = size_,
      .allocated_bytes = allocated_bytes_,
      .free_bytes = size_ - allocated_bytes_,
      .largest_free_block = largest,
      .allocated_blocks = allocated_.size(),
      .free_blocks = free_blocks_,
  };
}

std::vector<Block> BankAllocator::block_table() const {
  std::vector<Block> blocks;
  blocks.reserve(slots_.size() - free_slots_.size());
  for (const Slot& slot : slots_) {
    if (slot.in_use) blocks.push_back({slot.address, slot.size, slot.allocated});
  }
  std::ranges::sort(blocks, {}, &Block::address);
  return blocks;
}

Result<std::uint64_t> BankAllocator::allocated_size(std::uint64_t address) const {
  if (const auto found = allocated_.find(address); found != allocated_.end()) return slots_[found->second].size;
  return tl::unexpected(not_allocated(address));
}

bool BankAllocator::holds_same_blocks(const BankAllocator& other) const {
  if (allocated_.size() != other.allocated_.size() || allocated_bytes_ != other.allocated_bytes_) return false;
  return std::ranges::all_of(allocated_, [&](const auto& entry) {
    const auto theirs = other.allocated_.find(entry.first);
    return theirs != other.allocated_.end() && other.slots_[theirs->second].size == slots_[entry.second].size;
  });
}

Error BankAllocator::out_of_memory(std::uint64_t requested, std::uint64_t rounded) const {
  const AllocatorStatistics stats = statistics();
  return Error{ErrorCode::out_of_memory,
               fmt::format("out of memory: requested {} bytes ({} aligned), free {} of {} bytes, largest free "
                           "block {} bytes",
                           requested, rounded, stats.free_bytes, stats.total_bytes, stats.largest_free_block)};
}

// Only on the error path: a linear scan to tell a double free from an address never handed out.
Error BankAllocator::not_allocated(std::uint64_t address) const {
  const bool inside_free_block = std::ranges::any_of(slots_, [address](const Slot& slot) {
    return slot.in_use && !slot.allocated && address >= slot.address && address < slot.address + slot.size;
  });
  if (inside_free_block) {
    return Error{ErrorCode::double_free,
                 fmt::format("double free: address {:#x} is already free (allocated {} bytes in {} blocks)", address,
                             allocated_bytes_, allocated_.size())};
  }
  if (address < base_ || address >= base_ + size_) {
    return Error{ErrorCode::not_found, fmt::format("free of address {:#x}, outside the bank [{:#x}, {:#x})", address,
                                                   base_, base_ + size_)};
  }
  return Error{ErrorCode::not_found,
               fmt::format("free of address {:#x}, which is inside an allocated block but not its start", address)};
}

}  // namespace meshrt
