// Tensors on a mesh and the operations on them (ADR 0021): placement by mesh mappers, gathering
// by composers, add and matmul against a host reference, and the memory each step takes, as the
// layout implies it (shapes, tiles, pages), reported once and freed once per category.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <variant>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

std::vector<float> rounded(DataType dtype, const std::vector<float>& values) {
  std::vector<float> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = round_to(dtype, values[i]);
  return out;
}

// Host reference: a @ b over the last two dims, in double, from the inputs as the device holds them.
std::vector<float> host_matmul(const HostTensor& a, const HostTensor& b, DataType dtype) {
  const auto x = rounded(dtype, a.values);
  const auto y = rounded(dtype, b.values);
  const std::uint64_t batch = a.shape.batch();
  const std::uint64_t m = a.shape.height();
  const std::uint64_t k = a.shape.width();
  const std::uint64_t n = b.shape.width();
  std::vector<float> z(batch * m * n);
  for (std::uint64_t bi = 0; bi < batch; ++bi) {
    for (std::uint64_t i = 0; i < m; ++i) {
      for (std::uint64_t j = 0; j < n; ++j) {
        double sum = 0;
        for (std::uint64_t p = 0; p < k; ++p) sum += double{x[(bi * m + i) * k + p]} * double{y[(bi * k + p) * n + j]};
        z[(bi * m + i) * n + j] = static_cast<float>(sum);
      }
    }
  }
  return z;
}

// bfloat16 keeps 8 significant bits: within 2^-7 of the value, plus a little for sums near 0.
void check_close(const std::vector<float>& got, const std::vector<float>& want, DataType dtype) {
  REQUIRE(got.size() == want.size());
  const float rtol = dtype == DataType::bfloat16 ? 1.0F / 128 : 1e-5F;
  const float atol = dtype == DataType::bfloat16 ? 2e-2F : 1e-4F;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::fabs(got[i] - want[i]) > atol + rtol * std::fabs(want[i])) ++bad;
  }
  CHECK(bad == 0);
}

MeshMapperConfig mapper(std::vector<Placement> placements, MeshShape shape) {
  return {.placements = std::move(placements), .mesh_shape = shape};
}

}  // namespace

TEST_SUITE("tensors") {
  TEST_CASE("shapes, bfloat16 rounding and storage figures") {
    CHECK(to_string(TensorShape{8, 8, 512, 512}) == "(8, 8, 512, 512)");
    CHECK(to_string(TensorShape{7}) == "(7,)");
    CHECK(TensorShape{8, 8, 512, 512}.volume() == 8ULL * 8 * 512 * 512);
    CHECK(TensorShape::create(std::vector<std::uint32_t>{}).error().message == "a tensor has 1 to 4 dims, not 0");
    CHECK(TensorShape::create(std::vector<std::uint32_t>{1, 2, 3, 4, 5}).error().code == ErrorCode::invalid_argument);
    CHECK(TensorShape::create(std::vector<std::uint32_t>{4, 0}).error().message == "tensor shape (4, 0) has a dim of 0");
    CHECK(TensorShape::create(std::vector<std::uint32_t>{65536, 65536, 65536, 2}).error().code ==
          ErrorCode::invalid_argument);

    CHECK(from_bfloat16(to_bfloat16(1.0F)) == 1.0F);
    CHECK(round_to(DataType::bfloat16, 1.0F + 1.0F / 512) == 1.0F);         // below half an ulp: down
    CHECK(round_to(DataType::bfloat16, 1.0F + 3.0F / 256) == 1.015625F);     // 1 + 1.5 ulp: to even, up
    CHECK(std::isnan(round_to(DataType::bfloat16, std::nanf(""))));
    CHECK(round_to(DataType::float32, 1.0F + 1.0F / 512) == 1.0F + 1.0F / 512);

    // Tiles of 32x32: (4, 2, 512, 512) bfloat16 is 8 * 16 * 16 tiles of 2 KiB = 4 MiB.
    const TensorSpec seed{.shape = {4, 2, 512, 512}, .dtype = DataType::bfloat16, .layout = Layout::tile};
    CHECK(seed.page_size() == 2048);
    CHECK(seed.bytes() == 4ULL * 1024 * 1024);
    // Padding: (3, 40, 50) pads to (3, 64, 64), whole tiles of 4 KiB in float32.
    const TensorSpec padded{.shape = {3, 40, 50}, .dtype = DataType::float32, .layout = Layout::tile};
    CHECK(padded.bytes() == 3ULL * 2 * 2 * 4096);
    const TensorSpec rows{.shape = {3, 40, 50}, .dtype = DataType::bfloat16, .layout = Layout::row_major};
    CHECK(rows.page_size() == 100);
    CHECK(rows.bytes() == 3ULL * 40 * 50 * 2);
  }

  TEST_CASE("random host tensors: uniform from -1 up to 1, the same for a seed, different across seeds") {
    const HostTensor a = random_host_tensor({4, 64, 64}, 7);
    REQUIRE(a.values.size() == 4 * 64 * 64);
    CHECK(a.shape == TensorShape{4, 64, 64});
    CHECK(std::ranges::all_of(a.values, [](float v) { return v >= -1.0F && v < 1.0F; }));
    const auto [low, high] = std::ranges::minmax(a.values);
    CHECK(low < -0.99F);  // 16384 draws reach both ends
    CHECK(high > 0.99F);
    double mean = 0;
    for (const float v : a.values) mean += v;
    CHECK(std::fabs(mean / static_cast<double>(a.values.size())) < 0.05);
    CHECK(random_host_tensor({4, 64, 64}, 7).values == a.values);
    CHECK(random_host_tensor({4, 64, 64}, 8).values != a.values);
  }

  TEST_CASE("mesh mappers: shards, replicas and the Errors that name the shapes") {
    const MeshShape t3000{2, 4};
    CHECK(shard_shape({8, 8, 512, 512}, {PlacementShard{0}, PlacementShard{1}}, t3000).value() ==
          TensorShape{4, 2, 512, 512});
    CHECK(shard_shape({8, 8, 512, 512}, {PlacementReplicate{}, PlacementShard{3}}, t3000).value() ==
          TensorShape{8, 8, 512, 128});
    CHECK(shard_shape({6, 8}, {PlacementReplicate{}, PlacementReplicate{}}, t3000).value() == TensorShape{6, 8});
    CHECK(shard_shape({6, 8}, {PlacementShard{1}, PlacementShard{0}}, t3000).error().message ==
          "cannot shard dim 0 of (6, 8) (6 elements) evenly over the 4 columns of a 2x4 mesh");
    CHECK(shard_shape({6, 8}, {PlacementShard{2}, PlacementReplicate{}}, t3000).error().message ==
          "cannot shard dim 2 of a tensor of shape (6, 8): it has 2 dims");
    CHECK(shard_shape({8, 8}, {PlacementShard{0}, PlacementShard{0}}, t3000).error().message ==
          "both mesh dimensions shard dim 0 of (8, 8): shard distinct dims");
    CHECK(shard_shape({8, 8}, {PlacementShard{0}}, t3000).error().message ==
          "a mesh mapper has one placement per mesh dimension (rows, columns): 2, not 1");

    testing::Observed observed;
    auto mesh = MeshDevice::create(t3000, DeviceSpec::wormhole_b0(), observed.tracker).value();
    const auto opened = observed.log->events().size();  // the mesh's system buffers
    const HostTensor host = random_host_tensor({6, 8}, 1);
    const auto uneven = Tensor::from_host(mesh, host, DataType::bfloat16, Layout::tile,
                                          mapper({PlacementShard{1}, PlacementShard{0}}, t3000));
    REQUIRE_FALSE(uneven.has_value());
    CHECK(uneven.error().code == ErrorCode::invalid_argument);
    const auto other_mesh = Tensor::from_host(mesh, host, DataType::bfloat16, Layout::tile,
                                              MeshMapperConfig::replicate({1, 2}));
    CHECK(other_mesh.error().message == "the mesh mapper is for a 1x2 mesh, but the tensor's mesh is 2x4");
    const auto short_values = Tensor::from_host(mesh, HostTensor{.shape = {6, 8}, .values = {1.0F}}, DataType::bfloat16,
                                                Layout::tile, MeshMapperConfig::replicate(t3000));
    CHECK(short_values.error().message == "a host tensor of shape (6, 8) has 48 values, not 1");
    CHECK(observed.log->events().size() == opened);  // every Error came before anything was allocated
  }

  TEST_CASE("from_host and to_host round-trip every layout, data type and placement") {
    for (const MeshShape shape : {MeshShape{1, 1}, MeshShape{1, 2}, MeshShape{2, 4}, MeshShape{8, 4}}) {
      auto mesh = MeshDevice::create(shape, DeviceSpec::wormhole_b0(), std::make_shared<Tracker>()).value();
      const TensorShape global{8, 4, 40, 72};  // 40 x 72 pads to 64 x 96 in tiles
      const HostTensor host = random_host_tensor(global, shape.device_count());
      for (const DataType dtype : {DataType::bfloat16, DataType::float32}) {
        for (const Layout layout : {Layout::tile, Layout::row_major}) {
          for (const auto& placements : std::vector<std::vector<Placement>>{
                   {PlacementShard{0}, PlacementShard{1}},
                   {PlacementReplicate{}, PlacementShard{1}},
                   {PlacementShard{3}, PlacementReplicate{}},
                   {PlacementReplicate{}, PlacementReplicate{}}}) {
            CAPTURE(to_string(shape));
            CAPTURE(to_string(dtype));
            CAPTURE(to_string(layout));
            const auto tensor = Tensor::from_host(mesh, host, dtype, layout, mapper(placements, shape));
            if (!tensor) {
              // (8, 4, 40, 72) splits dim 1 over 4 columns and dim 3 over up to 8 rows (72 / 8 = 9).
              FAIL(tensor.error().message);
              continue;
            }
            // Gather along the sharded dims (a replicated mesh dim concatenates its copies).
            std::vector<std::uint32_t> dims{0, 1};
            if (const auto* row = std::get_if<PlacementShard>(&placements[0])) dims[0] = row->dim;
            if (const auto* col = std::get_if<PlacementShard>(&placements[1])) dims[1] = col->dim;
            const auto back = tensor->to_host({.dims = dims, .mesh_shape = shape});
            REQUIRE(back.has_value());
            const bool replicated_rows = std::holds_alternative<PlacementReplicate>(placements[0]);
            const bool replicated_cols = std::holds_alternative<PlacementReplicate>(placements[1]);
            if (!replicated_rows && !replicated_cols) {
              CHECK(back->shape == global);
              CHECK(back->values == rounded(dtype, host.values));
            }
            if (replicated_rows && replicated_cols) {
              CHECK(tensor->to_host().value().values == rounded(dtype, host.values));
            } else {
              CHECK(tensor->to_host().error().code == ErrorCode::invalid_argument);
            }
          }
        }
      }
    }
  }

  TEST_CASE("add and matmul equal the host reference on every mesh and placement") {
    for (const MeshShape shape : {MeshShape{1, 1}, MeshShape{1, 2}, MeshShape{2, 4}, MeshShape{8, 4}}) {
      auto mesh = MeshDevice::create(shape, DeviceSpec::wormhole_b0(), std::make_shared<Tracker>()).value();
      for (const DataType dtype : {DataType::bfloat16, DataType::float32}) {
        for (const auto& placements : std::vector<std::vector<Placement>>{{PlacementShard{0}, PlacementShard{1}},
                                                                          {PlacementReplicate{}, PlacementReplicate{}},
                                                                          {PlacementReplicate{}, PlacementShard{0}}}) {
          CAPTURE(to_string(shape));
          CAPTURE(to_string(dtype));
          const MeshMapperConfig placed = mapper(placements, shape);
          const MeshComposerConfig composer{.dims = {0, 1}, .mesh_shape = shape};
          const bool sharded = std::holds_alternative<PlacementShard>(placements[1]);
          const auto compare = [&](const Tensor& t, const TensorShape& global, const std::vector<float>& want) {
            if (sharded && std::holds_alternative<PlacementShard>(placements[0])) {
              const auto got = t.to_host(composer).value();
              CHECK(got.shape == global);
              check_close(got.values, want, dtype);
            } else if (!sharded) {
              check_close(t.to_host().value().values, want, dtype);
            } else {
              // Replicated over rows, dim 0 sharded over columns: device (r, c) holds batch slice c.
              const std::uint64_t slice = want.size() / shape.cols;
              for (std::uint32_t device = 0; device < shape.device_count(); ++device) {
                const std::uint64_t col = shape.coordinate_of(device).col;
                const std::vector<float> part(want.begin() + static_cast<std::ptrdiff_t>(col * slice),
                                              want.begin() + static_cast<std::ptrdiff_t>((col + 1) * slice));
                check_close(t.read_shard(DeviceId{device}).value().values, part, dtype);
              }
            }
          };
          const TensorShape ab{8, 4, 40, 64};
          const HostTensor a = random_host_tensor(ab, 11);
          const HostTensor b = random_host_tensor(ab, 12);
          const auto ta = Tensor::from_host(mesh, a, dtype, Layout::tile, placed).value();
          const auto tb = Tensor::from_host(mesh, b, dtype, Layout::tile, placed).value();
          const auto sum = add(mesh, ta, tb);
          REQUIRE(sum.has_value());
          std::vector<float> want_sum(a.values.size());
          const auto ra = rounded(dtype, a.values);
          const auto rb = rounded(dtype, b.values);
          for (std::size_t i = 0; i < want_sum.size(); ++i) want_sum[i] = ra[i] + rb[i];
          compare(*sum, ab, want_sum);

          const HostTensor x = random_host_tensor({8, 4, 40, 24}, 13);
          const HostTensor y = random_host_tensor({8, 4, 24, 36}, 14);
          const auto tx = Tensor::from_host(mesh, x, dtype, Layout::tile, placed).value();
          const auto ty = Tensor::from_host(mesh, y, dtype, Layout::tile, placed).value();
          const auto product = matmul(mesh, tx, ty);
          REQUIRE(product.has_value());
          CHECK(product->shape() == TensorShape{8, 4, 40, 36});
          compare(*product, {8, 4, 40, 36}, host_matmul(x, y, dtype));
        }
      }
    }
  }

  TEST_CASE("operations check their operands before anything is allocated") {
    testing::Observed observed;
    const MeshShape shape{2, 4};
    auto mesh = MeshDevice::create(shape, DeviceSpec::wormhole_b0(), observed.tracker).value();
    const MeshMapperConfig sharded = mapper({PlacementShard{0}, PlacementShard{1}}, shape);
    auto a = Tensor::from_host(mesh, random_host_tensor({2, 4, 32, 64}, 1), DataType::bfloat16, Layout::tile, sharded).value();
    auto b = Tensor::from_host(mesh, random_host_tensor({2, 4, 64, 32}, 2), DataType::bfloat16, Layout::tile, sharded).value();
    auto c = Tensor::from_host(mesh, random_host_tensor({2, 4, 32, 64}, 3), DataType::float32, Layout::tile, sharded).value();
    auto d = Tensor::from_host(mesh, random_host_tensor({2, 4, 32, 64}, 4), DataType::bfloat16, Layout::tile,
                               MeshMapperConfig::replicate(shape))
                 .value();
    const auto events = observed.log->events().size();
    CHECK(add(mesh, a, b).error().message == "add: shapes differ: a is (2, 4, 32, 64), b is (2, 4, 64, 32)");
    CHECK(add(mesh, a, c).error().message ==
          "add: operands differ in data type or layout: a is (2, 4, 32, 64) bfloat16 tile, b is (2, 4, 32, 64) float32 tile");
    CHECK(add(mesh, a, d).error().message ==
          "add: operands are placed differently: a [shard(0), shard(1)], b [replicate, replicate]");
    CHECK(matmul(mesh, a, a).error().message ==
          "matmul: cannot multiply (2, 4, 32, 64) by (2, 4, 32, 64): a's last dim is not b's second-to-last");
    auto wide = Tensor::from_host(mesh, random_host_tensor({2, 64}, 5), DataType::bfloat16, Layout::tile, sharded).value();
    auto tall = Tensor::from_host(mesh, random_host_tensor({64, 4}, 6), DataType::bfloat16, Layout::tile, sharded).value();
    const auto after_wide = observed.log->events().size();
    CHECK(matmul(mesh, wide, tall).error().message ==
          "matmul: cannot multiply (2, 64) by (64, 4): each device multiplies its own shards, so only batch dims may "
          "be sharded, not dim 0");
    CHECK(observed.log->events().size() == after_wide);
    CHECK(after_wide == events + 2 * 8);  // only `wide` and `tall` were allocated in between
    a.deallocate();
    CHECK(add(mesh, a, a).error().message.find("add: operand a ((2, 4, 32, 64) bfloat16 tile) is not on the device") == 0);
  }

  TEST_CASE("the seed's steps: every figure follows from the layout, and close frees the rest once") {
    // The seed's shapes scaled down (the demo and the bench run them whole): a half and a quarter of each side.
    const std::uint32_t side = testing::sanitized_build ? 64 : 256;
    const std::uint32_t mm = testing::sanitized_build ? 64 : 128;
    testing::Observed observed;
    const MeshShape shape{2, 4};
    auto mesh = MeshDevice::create(shape, DeviceSpec::wormhole_b0(), observed.tracker).value();
    const MeshMapperConfig sharded = mapper({PlacementShard{0}, PlacementShard{1}}, shape);
    const std::uint64_t tensor_bytes = 4ULL * 2 * side * side * 2;  // (4, 2, side, side) bfloat16 per device
    const auto dram_buffers = [&](std::uint32_t device) {
      return observed.on(device, BufferType::dram, AllocationCategory::buffer);
    };

    auto a = Tensor::from_host(mesh, random_host_tensor({8, 8, side, side}, 1), DataType::bfloat16, Layout::tile, sharded).value();
    for (std::uint32_t device = 0; device < 8; ++device) CHECK(dram_buffers(device) == LiveBufferSummary{1, tensor_bytes});
    auto b = Tensor::from_host(mesh, random_host_tensor({8, 8, side, side}, 2), DataType::bfloat16, Layout::tile, sharded).value();
    for (std::uint32_t device = 0; device < 8; ++device) CHECK(dram_buffers(device) == LiveBufferSummary{2, 2 * tensor_bytes});

    auto sum = add(mesh, a, b).value();
    const Program add_run = add_program(a.shard_spec());
    for (std::uint32_t device = 0; device < 8; ++device) {
      CHECK(dram_buffers(device) == LiveBufferSummary{3, 3 * tensor_bytes});
      CHECK(observed.on(device, BufferType::dram, AllocationCategory::program) ==
            LiveBufferSummary{1, add_run.binary_bytes()});
      CHECK(observed.on(device, BufferType::l1, AllocationCategory::circular_buffer) == LiveBufferSummary{});
    }
    // While it ran, its three circular buffers of two bfloat16 tiles took 3 * 4 KiB on each of 64 cores.
    std::uint64_t cb_allocs = 0;
    for (const AllocationEvent& event : observed.log->of_kind(EventKind::allocate)) {
      if (event.category != AllocationCategory::circular_buffer) continue;
      ++cb_allocs;
      CHECK(event.size == 2ULL * 2048 * 64);
    }
    CHECK(cb_allocs == 3 * 8);

    auto x = Tensor::from_host(mesh, random_host_tensor({8, 8, mm, 128}, 3), DataType::bfloat16, Layout::tile, sharded).value();
    auto y = Tensor::from_host(mesh, random_host_tensor({8, 8, 128, mm}, 4), DataType::bfloat16, Layout::tile, sharded).value();
    auto product = matmul(mesh, x, y).value();
    const std::uint64_t x_bytes = 4ULL * 2 * mm * 128 * 2;
    const std::uint64_t product_bytes = 4ULL * 2 * mm * mm * 2;
    const Program matmul_run = matmul_program(x.shard_spec(), y.shard_spec());
    const std::uint64_t cached = add_run.binary_bytes() + matmul_run.binary_bytes();
    CHECK(cached == 36864);  // about 36 KB per device, as the seed saw
    for (std::uint32_t device = 0; device < 8; ++device) {
      CHECK(dram_buffers(device) == LiveBufferSummary{6, 3 * tensor_bytes + 2 * x_bytes + product_bytes});
      CHECK(observed.on(device, BufferType::dram, AllocationCategory::program) == LiveBufferSummary{2, cached});
    }

    // Deallocating one by one: each device's DRAM drops by exactly that tensor.
    std::uint64_t expected = 3 * tensor_bytes + 2 * x_bytes + product_bytes;
    for (auto* t : {&a, &b, &sum, &x, &y, &product}) {
      expected -= t->bytes_per_device();
      t->deallocate();
      t->deallocate();  // idempotent
      for (std::uint32_t device = 0; device < 8; ++device) CHECK(dram_buffers(device).bytes == expected);
    }
    CHECK(expected == 0);
    mesh.disable_and_clear_program_cache();
    for (std::uint32_t device = 0; device < 8; ++device) {
      CHECK(observed.on(device, BufferType::dram, AllocationCategory::program) == LiveBufferSummary{});
    }
    mesh.close();
    const auto audit = observed.log->audit();
    CHECK(audit.still_live == 0);
    CHECK(audit.double_frees == 0);
    CHECK(audit.unknown_frees == 0);
    CHECK(observed.table->active_allocations() == 0);
  }

  TEST_CASE("closing a mesh with live tensors and cached programs frees everything once, device_closed") {
    testing::Observed observed;
    const MeshShape shape{1, 2};
    auto mesh = MeshDevice::create(shape, DeviceSpec::wormhole_b0(), observed.tracker).value();
    const MeshMapperConfig sharded = mapper({PlacementReplicate{}, PlacementShard{0}}, shape);
    auto a = Tensor::from_host(mesh, random_host_tensor({4, 64, 64}, 1), DataType::bfloat16, Layout::tile, sharded).value();
    auto b = add(mesh, a, a).value();
    const auto frees_before = observed.log->of_kind(EventKind::free).size();
    mesh.close();
    const auto frees = observed.log->of_kind(EventKind::free);
    // a, b and the add's binaries on both devices, then the three system buffers of each, last.
    REQUIRE(frees.size() == frees_before + 3 * 2 + 3 * 2);
    for (std::size_t i = frees_before; i < frees.size(); ++i) {
      CHECK(frees[i].reason == FreeReason::device_closed);
      CHECK((frees[i].category == AllocationCategory::system) == (i >= frees_before + 3 * 2));
    }
    CHECK(observed.log->audit().still_live == 0);
    CHECK_FALSE(a.is_allocated());
    CHECK(a.read_shard(DeviceId{0}).error().code == ErrorCode::device_closed);
    CHECK(a.to_host({.dims = {0, 0}, .mesh_shape = shape}).error().code == ErrorCode::device_closed);
    const auto after_close = add(mesh, a, b);
    REQUIRE_FALSE(after_close.has_value());
    CHECK(after_close.error().code == ErrorCode::device_closed);
    a.deallocate();  // nothing more to report
    {
      Tensor dropped = std::move(b);
    }
    CHECK(observed.log->of_kind(EventKind::free).size() == frees.size());
    CHECK(observed.log->audit().double_frees == 0);
  }
}

TEST_SUITE("tensors") {
  TEST_CASE("random workloads: one Alloc and one Free per buffer id in every category, allocators end empty") {
    const std::uint64_t sequences = testing::sanitized_build ? 6 : 24;
    for (std::uint64_t seed = 1; seed <= sequences; ++seed) {
      CAPTURE(seed);  // rerun one sequence by fixing this seed
      std::mt19937_64 random(seed);
      const auto pick = [&](std::uint64_t n) { return std::uniform_int_distribution<std::uint64_t>(0, n - 1)(random); };
      testing::Observed observed;
      const std::vector<MeshShape> shapes{{1, 1}, {1, 2}, {2, 2}, {2, 4}};
      const MeshShape shape = shapes[pick(shapes.size())];
      DeviceSpec spec = DeviceSpec::wormhole_b0();
      if (pick(2) == 0) spec.system_buffers = SystemBuffers::defaults(spec.l1.bank_count);
      auto mesh = MeshDevice::create(shape, spec, observed.tracker).value();
      const MeshMapperConfig placed = pick(2) == 0 ? MeshMapperConfig::replicate(shape)
                                                   : mapper({PlacementShard{0}, PlacementShard{1}}, shape);
      std::vector<Tensor> tensors;
      bool closed = false;
      for (int step = 0; step < 40; ++step) {
        switch (pick(8)) {
          case 0:
          case 1: {  // a new tensor, one of two shapes so that operations find partners
            const std::uint32_t side = pick(2) == 0 ? 32 : 48;
            auto t = Tensor::from_host(mesh, random_host_tensor({8, 4, side, side}, static_cast<std::uint32_t>(step)),
                                       DataType::bfloat16, pick(2) == 0 ? Layout::tile : Layout::row_major, placed);
            if (closed) {
              CHECK_FALSE(t.has_value());
            } else if (t) {
              tensors.push_back(std::move(*t));
            }
            break;
          }
          case 2:
          case 3:
            if (tensors.size() >= 2) {
              const Tensor& a = tensors[pick(tensors.size())];
              const Tensor& b = tensors[pick(tensors.size())];
              auto out = pick(2) == 0 ? add(mesh, a, b) : matmul(mesh, a, b);
              if (out) tensors.push_back(std::move(*out));  // mismatched operands are Errors: fine
            }
            break;
          case 4:
            if (!tensors.empty()) tensors[pick(tensors.size())].deallocate();
            break;
          case 5:
            if (!tensors.empty()) tensors.erase(tensors.begin() + static_cast<std::ptrdiff_t>(pick(tensors.size())));
            break;
          case 6:
            if (pick(2) == 0) {
              mesh.clear_program_cache();
            } else if (mesh.program_cache().is_enabled()) {
              mesh.disable_program_cache();
            } else {
              mesh.enable_program_cache();
            }
            break;
          default:
            if (pick(4) == 0) {
              mesh.close();
              closed = true;
            }
            break;
        }
        // Between steps no program runs: no circular buffer is ever left behind.
        for (std::uint32_t device = 0; device < shape.device_count(); ++device) {
          CHECK(observed.on(device, BufferType::l1, AllocationCategory::circular_buffer) == LiveBufferSummary{});
        }
      }
      if (!closed) {
        tensors.clear();
        mesh.clear_program_cache();
        CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::l1).value().allocated_bytes ==
              (spec.system_buffers.l1_dispatch == 0 ? 0 : SystemBuffers::page_size));
      }
      mesh.close();
      tensors.clear();
      CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::dram).value().allocated_bytes == 0);
      CHECK(mesh.allocator_statistics(DeviceId{0}, BufferType::l1).value().allocated_bytes == 0);
      const auto audit = observed.log->audit();
      CHECK(audit.still_live == 0);
      CHECK(audit.double_allocs == 0);
      CHECK(audit.double_frees == 0);
      CHECK(audit.unknown_frees == 0);
      // Per category: as many Frees as Allocs.
      for (const AllocationCategory category : all_allocation_categories) {
        std::size_t allocs = 0;
        std::size_t frees = 0;
        for (const AllocationEvent& event : observed.log->events()) {
          if (event.category != category) continue;
          (event.kind == EventKind::allocate ? allocs : frees) += 1;
        }
        CAPTURE(to_string(category));
        CHECK(allocs == frees);
      }
      CHECK(observed.table->active_allocations() == 0);
    }
  }
}
