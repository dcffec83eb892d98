// The bytes of a simulated device: sparse, so a 12 GiB device costs nothing until written.
module;
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

export module meshrt.device:simulated_memory;

import meshrt.core;

export namespace meshrt {

// Bytes per (buffer type, bank, address), stored in fixed chunks created on first write.
// Unwritten bytes read as zero.
class SimulatedMemory {
 public:
  static constexpr std::uint64_t chunk_size = 4096;

  void write(BufferType type, std::uint32_t bank, std::uint64_t address, std::span<const std::byte> bytes);
  void read(BufferType type, std::uint32_t bank, std::uint64_t address, std::span<std::byte> bytes) const;
  // Forgets [address, address + size) in `bank_count` banks: freed memory costs nothing again.
  void discard(BufferType type, std::uint32_t bank_count, std::uint64_t address, std::uint64_t size);
  void clear();
  // Bytes actually held (whole chunks): what the simulation costs in RSS.
  [[nodiscard]] std::uint64_t resident_bytes() const;

 private:
  using Chunk = std::array<std::byte, chunk_size>;
  using Bank = std::map<std::uint64_t, std::unique_ptr<Chunk>>;  // chunk index -> bytes
  [[nodiscard]] Bank& bank(BufferType type, std::uint32_t bank);
  [[nodiscard]] const Bank* find_bank(BufferType type, std::uint32_t bank) const;

  std::array<std::vector<Bank>, buffer_type_count> banks_;
};

}  // namespace meshrt
