module;
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <fmt/format.h>
#include <tl/expected.hpp>

module meshrt.ops;

import meshrt.core;
import meshrt.mesh;
import meshrt.program;
import meshrt.tensor;

namespace meshrt {

namespace {

// Binary sizes in the order of tt-metal's compiled kernels (reader, compute, writer): about
// 18 KB per operation, so the seed's add and matmul cache about 36 KB per device.
constexpr std::uint64_t reader_binary = 6144;
constexpr std::uint64_t compute_binary = 8192;
constexpr std::uint64_t writer_binary = 4096;
constexpr std::uint64_t tiles_per_circular_buffer = 2;  // double-buffered, as tt-metal's ops

std::uint64_t tile_bytes(DataType dtype) { return std::uint64_t{tile_height} * tile_width * element_size(dtype); }

std::vector<CircularBufferConfig> circular_buffers(DataType dtype, std::initializer_list<std::uint32_t> indices) {
  std::vector<CircularBufferConfig> configs;
  for (std::uint32_t index : indices) {
    configs.push_back({.index = index,
                       .total_size = tiles_per_circular_buffer * tile_bytes(dtype),
                       .page_size = tile_bytes(dtype)});
  }
  return configs;
}

std::string describe(const Tensor& t) {
  return fmt::format("{} {} {}", to_string(t.shape()), to_string(t.dtype()), to_string(t.layout()));
}

std::string describe(const std::vector<Placement>& placements) {
  std::string text;
  for (const Placement& p : placements) {
    if (!text.empty()) text += ", ";
    if (const auto* shard = std::get_if<PlacementShard>(&p)) {
      text += fmt::format("shard({})", shard->dim);
    } else {
      text += "replicate";
    }
  }
  return "[" + text + "]";
}

Result<void> check_operands(std::string_view op, MeshDevice& mesh, const Tensor& a, const Tensor& b) {
  for (const auto& [label, t] : {std::pair<std::string_view, const Tensor*>{"a", &a}, {"b", &b}}) {
    if (!t->is_allocated()) {
      const auto buffers = t->buffer().device_buffers();
      const bool closed = !buffers.empty() && buffers[0].owns_buffer() &&
                          buffers[0].state() == DeviceBufferState::device_closed;
      return fail(closed ? ErrorCode::device_closed : ErrorCode::invalid_argument,
                  fmt::format("{}: operand {} ({}) is not on the device: deallocated, or its mesh closed", op, label,
                              describe(*t)));
    }
    if (t->mesh_shape() != mesh.shape()) {
      return fail(ErrorCode::invalid_argument, fmt::format("{}: operand {} is on a {} mesh, not this {} mesh", op,
                                                           label, to_string(t->mesh_shape()), to_string(mesh.shape())));
    }
  }
  if (a.dtype() != b.dtype() || a.layout() != b.layout()) {
    return fail(ErrorCode::invalid_argument, fmt::format("{}: operands differ in data type or layout: a is {}, b is {}",
                                                         op, describe(a), describe(b)));
  }
  if (a.placements() != b.placements()) {
    return fail(ErrorCode::invalid_argument, fmt::format("{}: operands are placed differently: a {}, b {}", op,
                                                         describe(a.placements()), describe(b.placements())));
  }
  return {};
}

// Allocates the output (shaped `shape`, typed and placed as `like`), runs `program` with a body
// that fills it on each device, and returns it; if the run fails, the output is freed with it.
template <class Body>
Result<Tensor> run_into_new_tensor(MeshDevice& mesh, Program program, const TensorShape& shape, const Tensor& like,
                                   std::string name, Body body) {
  auto output = Tensor::allocate(mesh, shape, like.dtype(), like.layout(), like.placements(), std::move(name));
  if (!output) return tl::unexpected(std::move(output.error()));
  program.body = [&](const ProgramContext& context) -> Result<void> { return body(context, *output); };
  if (auto run = run_program(mesh, program); !run) return tl::unexpected(std::move(run.error()));
  return std::move(*output);
}

}  // namespace

Program add_program(const TensorSpec& shard) {
  return Program{
      .name = "eltwise_binary_add",
      .cache_key = fmt::format("eltwise_binary_add {} {} {}", to_string(shard.shape), to_string(shard.dtype),
                               to_string(shard.layout)),
      .kernels = {{"reader_binary_interleaved", reader_binary},
                  {"eltwise_binary_compute", compute_binary},
                  {"writer_unary_interleaved", writer_binary}},
      .circular_buffers = circular_buffers(shard.dtype, {0, 1, 16}),
      .body = {}};
}

Program matmul_program(const TensorSpec& a_shard, const TensorSpec& b_shard) {
  return Program{
      .name = "matmul_multi_core",
      .cache_key = fmt::format("matmul_multi_core {} @ {} {} {}", to_string(a_shard.shape), to_string(b_shard.shape),
                               to_string(a_shard.dtype), to_string(a_shard.layout)),
      .kernels = {{"reader_bmm_tile_layout", reader_binary},
                  {"bmm_compute", compute_binary},
                  {"writer_bmm_tile_layout", writer_binary}},
      .circular_buffers = circular_buffers(a_shard.dtype, {0, 1, 16}),
      .body = {}};
}

Result<Tensor> add(MeshDevice& mesh, const Tensor& a, const Tensor& b, std::string name) {
  if (auto valid = check_operands("add", mesh, a, b); !valid) return tl::unexpected(std::move(valid.error()));
  if (!(a.shape() == b.shape())) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("add: shapes differ: a is {}, b is {}", to_string(a.shape()), to_string(b.shape())));
  }
  const DataType dtype = a.dtype();
  // Same layout, so the stored orders match: add page by page, padding included.
  const auto sum = [&](const ProgramContext& context, Tensor& output) -> Result<void> {
    auto lhs = a.read_stored(context.device);
    if (!lhs) return tl::unexpected(std::move(lhs.error()));
    auto rhs = b.read_stored(context.device);
    if (!rhs) return tl::unexpected(std::move(rhs.error()));
    std::vector<float>& values = *lhs;
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = round_to(dtype, values[i] + (*rhs)[i]);
    return output.write_stored(context.device, values);
  };
  return run_into_new_tensor(mesh, add_program(a.shard_spec()), a.shape(), a, std::move(name), sum);
}

Result<Tensor> matmul(MeshDevice& mesh, const Tensor& a, const Tensor& b, std::string name) {
  if (auto valid = check_operands("matmul", mesh, a, b); !valid) return tl::unexpected(std::move(valid.error()));
  const TensorShape& sa = a.shape();
  const TensorShape& sb = b.shape();
  const std::size_t rank = sa.rank();
  const auto mismatch = [&](std::string_view why) {
    return fail(ErrorCode::invalid_argument,
                fmt::format("matmul: cannot multiply {} by {}: {}", to_string(sa), to_string(sb), why));
  };
  if (rank < 2 || sb.rank() != rank) return mismatch("both need the same rank, at least 2");
  for (std::size_t d = 0; d + 2 < rank; ++d) {
    if (sa[d] != sb[d]) return mismatch(fmt::format("batch dim {} differs", d));
  }
  if (sa[rank - 1] != sb[rank - 2]) return mismatch("a's last dim is not b's second-to-last");
  for (const Placement& p : a.placements()) {
    if (const auto* shard = std::get_if<PlacementShard>(&p); shard != nullptr && shard->dim + 2 >= rank) {
      return mismatch(fmt::format("each device multiplies its own shards, so only batch dims may be sharded, not dim {}",
                                  shard->dim));
    }
  }
  const TensorShape out_shape = sa.with_dim(rank - 1, sb[rank - 1]);
  const DataType dtype = a.dtype();
  const auto multiply = [&](const ProgramContext& context, Tensor& output) -> Result<void> {
    auto lhs = a.read_shard(context.device);
    if (!lhs) return tl::unexpected(std::move(lhs.error()));
    auto rhs = b.read_shard(context.device);
    if (!rhs) return tl::unexpected(std::move(rhs.error()));
    const std::uint64_t batch = lhs->shape.batch();
    const std::uint64_t m = lhs->shape.height();
    const std::uint64_t k = lhs->shape.width();
    const std::uint64_t n = rhs->shape.width();
    HostTensor product{.shape = output.shard_spec().shape, .values = std::vector<float>(batch * m * n, 0.0F)};
    for (std::uint64_t bi = 0; bi < batch; ++bi) {
      const float* x = lhs->values.data() + bi * m * k;
      const float* y = rhs->values.data() + bi * k * n;
      float* z = product.values.data() + bi * m * n;
      // i-k-j order: the inner loop runs along rows of y and z, which the compiler vectorizes.
      for (std::uint64_t i = 0; i < m; ++i) {
        for (std::uint64_t p = 0; p < k; ++p) {
          const float xv = x[i * k + p];
          for (std::uint64_t j = 0; j < n; ++j) z[i * n + j] += xv * y[p * n + j];
        }
      }
    }
    for (float& v : product.values) v = round_to(dtype, v);
    return output.write_shard(context.device, product);
  };
  return run_into_new_tensor(mesh, matmul_program(a.shard_spec(), b.shard_spec()), out_shape, a, std::move(name),
                             multiply);
}

}  // namespace meshrt
