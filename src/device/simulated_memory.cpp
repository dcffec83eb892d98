module;
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <span>
#include <vector>

module meshrt.device;

import meshrt.core;
import meshrt.alloc;

namespace meshrt {

SimulatedMemory::Bank& SimulatedMemory::bank(BufferType type, std::uint32_t bank) {
  auto& banks = banks_[index_of(type)];
  if (banks.size() <= bank) banks.resize(std::size_t{bank} + 1);
  return banks[bank];
}

const SimulatedMemory::Bank* SimulatedMemory::find_bank(BufferType type, std::uint32_t bank) const {
  const auto& banks = banks_[index_of(type)];
  return bank < banks.size() ? &banks[bank] : nullptr;
}

void SimulatedMemory::write(BufferType type, std::uint32_t bank_index, std::uint64_t address,
                            std::span<const std::byte> bytes) {
  Bank& chunks = bank(type, bank_index);
  while (!bytes.empty()) {
    const std::uint64_t offset = address % chunk_size;
    const std::size_t n = std::min<std::size_t>(bytes.size(), chunk_size - offset);
    auto& chunk = chunks[address / chunk_size];
    if (!chunk) chunk = std::make_unique<Chunk>();  // value-initialised: zeros
    std::memcpy(chunk->data() + offset, bytes.data(), n);
    bytes = bytes.subspan(n);
    address += n;
  }
}

void SimulatedMemory::read(BufferType type, std::uint32_t bank_index, std::uint64_t address,
                           std::span<std::byte> bytes) const {
  const Bank* chunks = find_bank(type, bank_index);
  while (!bytes.empty()) {
    const std::uint64_t offset = address % chunk_size;
    const std::size_t n = std::min<std::size_t>(bytes.size(), chunk_size - offset);
    const auto found = chunks == nullptr ? Bank::const_iterator{} : chunks->find(address / chunk_size);
    if (chunks != nullptr && found != chunks->end()) {
      std::memcpy(bytes.data(), found->second->data() + offset, n);
    } else {
      std::fill_n(bytes.begin(), n, std::byte{0});
    }
    bytes = bytes.subspan(n);
    address += n;
  }
}

void SimulatedMemory::discard(BufferType type, std::uint32_t bank_count, std::uint64_t address, std::uint64_t size) {
  const std::uint64_t end = address + size;
  for (std::uint32_t b = 0; b < bank_count; ++b) {
    if (find_bank(type, b) == nullptr) continue;
    Bank& chunks = bank(type, b);
    // Whole chunks inside the range go; chunks shared with a neighbouring buffer are zeroed in part.
    for (auto it = chunks.lower_bound(address / chunk_size); it != chunks.end() && it->first * chunk_size < end;) {
      const std::uint64_t chunk_start = it->first * chunk_size;
      const std::uint64_t from = std::max(chunk_start, address);
      const std::uint64_t to = std::min(chunk_start + chunk_size, end);
      if (from == chunk_start && to == chunk_start + chunk_size) {
        it = chunks.erase(it);
        continue;
      }
      std::fill(it->second->begin() + static_cast<std::ptrdiff_t>(from - chunk_start),
                it->second->begin() + static_cast<std::ptrdiff_t>(to - chunk_start), std::byte{0});
      // A chunk left all zeros reads as if never written: let it go (banks start above their
      // reserved bases, so buffers rarely start on a chunk boundary).
      const Chunk& bytes = *it->second;  // all zeros: the first is, and each equals the next
      if (bytes[0] == std::byte{0} && std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0) {
        it = chunks.erase(it);
        continue;
      }
      ++it;
    }
  }
}

void SimulatedMemory::clear() {
  for (auto& banks : banks_) banks.clear();
}

std::uint64_t SimulatedMemory::resident_bytes() const {
  std::uint64_t chunks = 0;
  for (const auto& banks : banks_) {
    for (const Bank& b : banks) chunks += b.size();
  }
  return chunks * chunk_size;
}

}  // namespace meshrt
