module;
#include <algorithm>
#include <bit>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

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
  return BankAllocator(base, size, alignment);
}

BankAllocator::BankAllocator(std::uint64_t base, std::uint64_t size, std::uint64_t alignment)
    : base_(base), size_(size), alignment_(alignment) {
  insert_free(base_, size_);
}

void BankAllocator::insert_free(std::uint64_t address, std::uint64_t size) {
  free_by_size_.emplace(size, address);
  free_by_start_.emplace(address, size);
  free_by_end_.emplace(address + size, address);
}

void BankAllocator::erase_free(std::uint64_t address, std::uint64_t size) {
  free_by_size_.erase({size, address});
  free_by_start_.erase(address);
  free_by_end_.erase(address + size);
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
  const std::uint64_t align = std::max(alignment, alignment_);
  if (size > size_) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("requested {} bytes, larger than the whole bank of {} bytes", size, size_));
  }
  const std::uint64_t rounded = round_up(size, alignment_);

  // Smallest blocks first; within a run of equal sizes, lowest address first for bottom-up and
  // highest first for top-down. With the granule alignment the first candidate always fits; a
  // larger alignment may need padding, so keep looking (the rare, slower path).
  const auto fits = [&](std::uint64_t block_address, std::uint64_t block_size) -> std::optional<std::uint64_t> {
    const std::uint64_t block_end = block_address + block_size;
    const std::uint64_t address = direction == AllocationDirection::bottom_up ? round_up(block_address, align)
                                                                              : round_down(block_end - rounded, align);
    if (address >= block_address && address + rounded <= block_end) return address;
    return std::nullopt;
  };
  for (auto run = free_by_size_.lower_bound({rounded, 0}); run != free_by_size_.end();) {
    const std::uint64_t block_size = run->first;
    const auto run_end = free_by_size_.upper_bound({block_size, std::numeric_limits<std::uint64_t>::max()});
    std::optional<std::pair<std::uint64_t, std::uint64_t>> taken;  // (block address, allocation address)
    if (direction == AllocationDirection::bottom_up) {
      for (auto it = run; it != run_end && !taken; ++it) {
        if (const auto address = fits(it->second, block_size)) taken.emplace(it->second, *address);
      }
    } else {
      for (auto it = run_end; it != run && !taken;) {
        --it;
        if (const auto address = fits(it->second, block_size)) taken.emplace(it->second, *address);
      }
    }
    if (taken) {
      const auto [block_address, address] = *taken;
      const std::uint64_t block_end = block_address + block_size;
      erase_free(block_address, block_size);
      if (address > block_address) insert_free(block_address, address - block_address);
      if (address + rounded < block_end) insert_free(address + rounded, block_end - address - rounded);
      allocated_.emplace(address, rounded);
      allocated_bytes_ += rounded;
      return address;
    }
    run = run_end;
  }
  return tl::unexpected(out_of_memory(size, rounded));
}

Result<void> BankAllocator::free(std::uint64_t address) {
  const auto found = allocated_.find(address);
  if (found == allocated_.end()) return tl::unexpected(not_allocated(address));
  std::uint64_t start = address;
  std::uint64_t size = found->second;
  allocated_bytes_ -= size;
  allocated_.erase(found);

  if (const auto after = free_by_start_.find(start + size); after != free_by_start_.end()) {
    const std::uint64_t after_size = after->second;
    erase_free(start + size, after_size);
    size += after_size;
  }
  if (const auto before = free_by_end_.find(start); before != free_by_end_.end()) {
    const std::uint64_t before_start = before->second;
    const std::uint64_t before_size = start - before_start;
    erase_free(before_start, before_size);
    start = before_start;
    size += before_size;
  }
  insert_free(start, size);
  return {};
}

void BankAllocator::reset() {
  free_by_size_.clear();
  free_by_start_.clear();
  free_by_end_.clear();
  allocated_.clear();
  allocated_bytes_ = 0;
  insert_free(base_, size_);
}

AllocatorStatistics BankAllocator::statistics() const {
  return AllocatorStatistics{
      .total_bytes = size_,
      .allocated_bytes = allocated_bytes_,
      .free_bytes = size_ - allocated_bytes_,
      .largest_free_block = free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first,
      .allocated_blocks = allocated_.size(),
      .free_blocks = free_by_start_.size(),
  };
}

std::vector<Block> BankAllocator::block_table() const {
  std::vector<Block> blocks;
  blocks.reserve(allocated_.size() + free_by_start_.size());
  for (const auto& [address, size] : allocated_) blocks.push_back({address, size, true});
  for (const auto& [address, size] : free_by_start_) blocks.push_back({address, size, false});
  std::ranges::sort(blocks, {}, &Block::address);
  return blocks;
}

Result<std::uint64_t> BankAllocator::allocated_size(std::uint64_t address) const {
  if (const auto found = allocated_.find(address); found != allocated_.end()) return found->second;
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
  const bool inside_free_block = std::ranges::any_of(free_by_start_, [address](const auto& block) {
    return address >= block.first && address < block.first + block.second;
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
