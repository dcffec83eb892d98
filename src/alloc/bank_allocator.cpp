module;
#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <limits>
#include <set>
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

Result<BankAllocator> BankAllocator::create(std::uint64_t base, std::uint64_t size, std::uint64_t alignment) {
  if (alignment == 0 || !std::has_single_bit(alignment)) {
    return fail(ErrorCode::invalid_argument, fmt::format("allocator alignment {} is not a power of two", alignment));
  }
  if (size == 0 || size % alignment != 0 || base % alignment != 0) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("allocator range [{:#x}, +{}) must be non-empty and aligned to {} bytes", base, size,
                            alignment));
  }
  if (base > std::numeric_limits<std::uint64_t>::max() - size) {
    return fail(ErrorCode::invalid_argument, fmt::format("allocator range [{:#x}, +{}) overflows", base, size));
  }
  if (base > std::numeric_limits<std::uint64_t>::max() - size) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("allocator range [{:#x}, +{}) passes the end of a 64-bit address space", base, size));
  }
  return BankAllocator(base, size, alignment);
}

BankAllocator::BankAllocator(std::uint64_t base, std::uint64_t size, std::uint64_t alignment)
    : base_(base), size_(size), alignment_(alignment), buckets_(bucketed_granules + 1) {
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

// Free blocks are findable by size: small ones in their exact-size bucket, large ones in the set.
void BankAllocator::index_free(Index index) {
  Slot& block = slots_[index];
  block.allocated = false;
  ++free_blocks_;
  const std::uint64_t granules = block.size / alignment_;
  if (granules > bucketed_granules) {
    large_.emplace(block.size, block.address, index);
    return;
  }
  auto& bucket = buckets_[granules];
  block.position = static_cast<Index>(bucket.size());
  bucket.push_back(index);
  bucket_bits_[granules / 64] |= std::uint64_t{1} << (granules % 64);
}

void BankAllocator::unindex_free(Index index) {
  const Slot& block = slots_[index];
  --free_blocks_;
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
      return buckets_[bucket].back();  // the most recently freed: warm in cache
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

// With an alignment above the granule a block may need padding: take the first block, from the
// smallest size up, that holds the request once aligned. Rare, and linear in the worst case.
BankAllocator::Index BankAllocator::first_fit_aligned(std::uint64_t rounded, std::uint64_t align,
                                                      AllocationDirection direction) const {
  const auto fits = [&](Index index) {
    const Slot& block = slots_[index];
    const std::uint64_t address = place(block, rounded, align, direction);
    return block.size >= rounded && address >= block.address && address + rounded <= block.address + block.size;
  };
  for (std::uint64_t granules = rounded / alignment_; granules <= bucketed_granules; ++granules) {
    for (const Index index : buckets_[granules]) {
      if (fits(index)) return index;
    }
  }
  for (auto it = large_.lower_bound({rounded, 0, 0}); it != large_.end(); ++it) {
    if (fits(std::get<2>(*it))) return std::get<2>(*it);
  }
  return none;
}

// Cuts [address, address + size) out of the free block `index` (already unindexed); what is
// left on either side becomes free blocks of their own. Returns the slot of the cut piece.
BankAllocator::Index BankAllocator::split_off(Index index, std::uint64_t address, std::uint64_t size) {
  Slot block = slots_[index];
  if (address > block.address) {  // a free piece below
    const Index below = new_slot(block.address, address - block.address);
    slots_[below].previous = block.previous;
    slots_[below].next = index;
    if (block.previous != none) slots_[block.previous].next = below;
    slots_[index].previous = below;
    slots_[index].address = address;
    slots_[index].size -= address - block.address;
    index_free(below);
  }
  block = slots_[index];
  if (block.size > size) {  // a free piece above
    const Index above = new_slot(address + size, block.size - size);
    slots_[above].previous = index;
    slots_[above].next = block.next;
    if (block.next != none) slots_[block.next].previous = above;
    slots_[index].next = above;
    slots_[index].size = size;
    index_free(above);
  }
  return index;
}

Result<std::uint64_t> BankAllocator::allocate(std::uint64_t size, AllocationDirection direction,
                                              std::uint64_t alignment) {
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
  const std::uint64_t align = std::max(alignment, alignment_);
  const std::uint64_t rounded = round_up(size, alignment_);
  const Index index = align == alignment_ ? best_fit(rounded) : first_fit_aligned(rounded, align, direction);
  if (index == none) return tl::unexpected(out_of_memory(size, rounded));

  unindex_free(index);
  const std::uint64_t address = place(slots_[index], rounded, align, direction);
  const Index taken = split_off(index, address, rounded);
  slots_[taken].allocated = true;
  allocated_.emplace(address, taken);
  allocated_bytes_ += rounded;
  return address;
}

Result<void> BankAllocator::free(std::uint64_t address) {
  const auto found = allocated_.find(address);
  if (found == allocated_.end()) return tl::unexpected(not_allocated(address));
  Index index = found->second;
  allocated_.erase(found);
  allocated_bytes_ -= slots_[index].size;
  slots_[index].allocated = false;

  // Coalesce: absorb a free block after, then let a free block before absorb this one.
  if (const Index next = slots_[index].next; next != none && !slots_[next].allocated) {
    unindex_free(next);
    slots_[index].size += slots_[next].size;
    slots_[index].next = slots_[next].next;
    if (slots_[next].next != none) slots_[slots_[next].next].previous = index;
    drop_slot(next);
  }
  if (const Index previous = slots_[index].previous; previous != none && !slots_[previous].allocated) {
    unindex_free(previous);
    slots_[previous].size += slots_[index].size;
    slots_[previous].next = slots_[index].next;
    if (slots_[index].next != none) slots_[slots_[index].next].previous = previous;
    drop_slot(index);
    index = previous;
  }
  index_free(index);
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
  index_free(new_slot(base_, size_));
}

AllocatorStatistics BankAllocator::statistics() const {
  std::uint64_t largest = large_.empty() ? 0 : std::get<0>(*large_.rbegin());
  if (largest == 0) {
    for (std::size_t word = bucket_bits_.size(); word-- > 0;) {
      if (bucket_bits_[word] != 0) {
        largest = (word * 64 + 63 - static_cast<std::size_t>(std::countl_zero(bucket_bits_[word]))) * alignment_;
        break;
      }
    }
  }
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
