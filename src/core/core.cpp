module;
#include <charconv>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.core;

namespace meshrt {

std::string_view to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid argument";
    case ErrorCode::out_of_memory: return "out of memory";
    case ErrorCode::not_found: return "not found";
    case ErrorCode::double_free: return "double free";
    case ErrorCode::device_closed: return "device closed";
    case ErrorCode::io_error: return "i/o error";
    case ErrorCode::protocol_error: return "protocol error";
    case ErrorCode::limit_exceeded: return "limit exceeded";
    case ErrorCode::permission_denied: return "permission denied";
  }
  return "unknown error";
}

tl::unexpected<Error> fail(ErrorCode code, std::string message) {
  return tl::unexpected<Error>(Error{code, std::move(message)});
}

std::string_view to_string(BufferType type) {
  switch (type) {
    case BufferType::dram: return "dram";
    case BufferType::l1: return "l1";
    case BufferType::l1_small: return "l1_small";
    case BufferType::trace: return "trace";
  }
  return "unknown";
}

Result<BufferType> parse_buffer_type(std::string_view text) {
  for (const BufferType type : all_buffer_types) {
    if (to_string(type) == text) return type;
  }
  return fail(ErrorCode::invalid_argument,
              fmt::format("unknown buffer type '{}': expected dram, l1, l1_small or trace", text));
}

std::string_view to_string(AllocationCategory category) {
  switch (category) {
    case AllocationCategory::buffer: return "buffer";
    case AllocationCategory::system: return "system";
    case AllocationCategory::program: return "program";
    case AllocationCategory::circular_buffer: return "circular_buffer";
  }
  return "unknown";
}

Result<AllocationCategory> parse_allocation_category(std::string_view text) {
  for (const AllocationCategory category : all_allocation_categories) {
    if (to_string(category) == text) return category;
  }
  return fail(ErrorCode::invalid_argument,
              fmt::format("unknown allocation category '{}': expected buffer, system, program or circular_buffer", text));
}

namespace {

bool parse_dimension(std::string_view text, std::uint32_t& out) {
  const auto* const last = text.data() + text.size();
  const auto [end, error] = std::from_chars(text.data(), last, out);
  return error == std::errc{} && end == last && !text.empty();
}

}  // namespace

Result<MeshShape> parse_mesh_shape(std::string_view text) {
  const auto x = text.find('x');
  MeshShape shape{0, 0};
  if (x == std::string_view::npos || !parse_dimension(text.substr(0, x), shape.rows) ||
      !parse_dimension(text.substr(x + 1), shape.cols)) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("bad mesh shape '{}': expected ROWSxCOLS, e.g. 2x4", text));
  }
  if (shape.rows == 0 || shape.cols == 0 || shape.rows > max_mesh_dimension || shape.cols > max_mesh_dimension) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("bad mesh shape '{}': each side must be between 1 and {}", text, max_mesh_dimension));
  }
  return shape;
}

std::string to_string(MeshShape shape) { return fmt::format("{}x{}", shape.rows, shape.cols); }

std::string to_string(MeshCoordinate coordinate) { return fmt::format("({}, {})", coordinate.row, coordinate.col); }

Result<std::uint32_t> checked_index(MeshShape shape, MeshCoordinate coordinate) {
  if (!shape.contains(coordinate)) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("coordinate {} is outside the {} mesh: rows 0 to {}, columns 0 to {}", to_string(coordinate),
                            to_string(shape), shape.rows - 1, shape.cols - 1));
  }
  return shape.index_of(coordinate);
}

std::int64_t wall_clock_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace meshrt
