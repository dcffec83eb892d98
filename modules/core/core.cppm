// meshrt.core — the vocabulary every other module speaks: ids, mesh geometry, buffer types and
// the error type that crosses every API boundary.
module;
#include <array>
#include <compare>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include <tl/expected.hpp>

export module meshrt.core;

export namespace meshrt {

// A strongly typed integer id: a DeviceId can't be passed where a BufferId is expected.
template <class Tag, class Rep>
class StrongId {
 public:
  using rep_type = Rep;
  constexpr StrongId() = default;
  constexpr explicit StrongId(Rep value) : value_(value) {}
  [[nodiscard]] constexpr Rep value() const { return value_; }
  constexpr auto operator<=>(const StrongId&) const = default;

 private:
  Rep value_{};
};

using DeviceId = StrongId<struct DeviceIdTag, std::uint32_t>;
// Process-unique and never reused: addresses are recycled by the allocator, ids are not.
using BufferId = StrongId<struct BufferIdTag, std::uint64_t>;
using MeshBufferId = StrongId<struct MeshBufferIdTag, std::uint64_t>;

enum class ErrorCode : std::uint8_t {
  invalid_argument,   // the request itself is wrong (size 0, bad shape, bad alignment...)
  out_of_memory,      // valid request, no room
  not_found,          // names something that does not exist (unknown address, unknown preset)
  double_free,        // frees something already free
  device_closed,      // the mesh device was closed
  io_error,           // socket or file trouble
  protocol_error,     // malformed or unexpected wire data
  limit_exceeded,     // a configured limit was hit
  permission_denied,  // the caller may not do this
};

[[nodiscard]] std::string_view to_string(ErrorCode code);

// meshrt's release; CMakeLists.txt checks it equals the project's VERSION.
inline constexpr std::string_view runtime_version = "0.1.0";

struct Error {
  ErrorCode code{ErrorCode::invalid_argument};
  std::string message;
};

template <class T>
using Result = tl::expected<T, Error>;

// `return fail(ErrorCode::x, "...")` from any function returning Result<T>.
[[nodiscard]] tl::unexpected<Error> fail(ErrorCode code, std::string message);

enum class BufferType : std::uint8_t { dram, l1, l1_small, trace };
inline constexpr std::array<BufferType, 4> all_buffer_types{BufferType::dram, BufferType::l1,
                                                            BufferType::l1_small, BufferType::trace};
inline constexpr std::size_t buffer_type_count = all_buffer_types.size();

[[nodiscard]] constexpr std::size_t index_of(BufferType type) { return static_cast<std::size_t>(type); }
[[nodiscard]] std::string_view to_string(BufferType type);
[[nodiscard]] Result<BufferType> parse_buffer_type(std::string_view text);

// What an allocation is for (ADR 0020): a user's or a tensor's buffer, the device's system
// buffers (command queue, dispatch), a cached program's kernel binaries, or a running program's
// circular buffers. Every view breaks memory down by it; the exactly-once rule holds per category.
enum class AllocationCategory : std::uint8_t { buffer, system, program, circular_buffer };
inline constexpr std::array<AllocationCategory, 4> all_allocation_categories{
    AllocationCategory::buffer, AllocationCategory::system, AllocationCategory::program,
    AllocationCategory::circular_buffer};
inline constexpr std::size_t allocation_category_count = all_allocation_categories.size();

[[nodiscard]] constexpr std::size_t index_of(AllocationCategory category) { return static_cast<std::size_t>(category); }
[[nodiscard]] std::string_view to_string(AllocationCategory category);
[[nodiscard]] Result<AllocationCategory> parse_allocation_category(std::string_view text);

struct MeshCoordinate {
  std::uint32_t row{};
  std::uint32_t col{};
  constexpr auto operator<=>(const MeshCoordinate&) const = default;
};

// Rows x columns of devices. A mesh of any shape from 1x1 up to max_mesh_dimension squared.
struct MeshShape {
  std::uint32_t rows{1};
  std::uint32_t cols{1};
  constexpr auto operator<=>(const MeshShape&) const = default;

  [[nodiscard]] constexpr std::uint32_t device_count() const { return rows * cols; }
  [[nodiscard]] constexpr bool contains(MeshCoordinate c) const { return c.row < rows && c.col < cols; }
  // Row-major index of a coordinate; the device at index i has DeviceId i within its mesh.
  [[nodiscard]] constexpr std::uint32_t index_of(MeshCoordinate c) const { return c.row * cols + c.col; }
  [[nodiscard]] constexpr MeshCoordinate coordinate_of(std::uint32_t index) const {
    return {index / cols, index % cols};
  }
};

inline constexpr std::uint32_t max_mesh_dimension = 8;

// a * b, or nullopt where it would pass 2^64: every product of user-given sizes goes through it.
[[nodiscard]] constexpr std::optional<std::uint64_t> checked_multiply(std::uint64_t a, std::uint64_t b) {
  std::uint64_t product = 0;
  if (__builtin_mul_overflow(a, b, &product)) return std::nullopt;
  return product;
}

// Parses "RxC" (e.g. "2x4"); rejects zero and anything above max_mesh_dimension per side.
[[nodiscard]] Result<MeshShape> parse_mesh_shape(std::string_view text);
[[nodiscard]] std::string to_string(MeshShape shape);
[[nodiscard]] std::string to_string(MeshCoordinate coordinate);
// The row-major index of `coordinate`, or an Error naming the mesh's bounds when it is outside.
[[nodiscard]] Result<std::uint32_t> checked_index(MeshShape shape, MeshCoordinate coordinate);

// Nanoseconds since the Unix epoch: the time events, records and answers carry.
[[nodiscard]] std::int64_t wall_clock_ns();

}  // namespace meshrt

export template <class Tag, class Rep>
struct std::hash<meshrt::StrongId<Tag, Rep>> {
  std::size_t operator()(meshrt::StrongId<Tag, Rep> id) const noexcept { return std::hash<Rep>{}(id.value()); }
};
