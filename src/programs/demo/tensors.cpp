// meshrt-demo --scenario tensors: the seed's test_mesh_allocation.py on meshrt. Open a mesh,
// distribute two bfloat16 (8, 8, 512, 512) tensors sharded on dims 0 and 1, add them, multiply
// (8, 8, 256, 128) by (8, 8, 128, 256), check both against host math, deallocate one by one,
// clear the program cache and close the mesh, printing each device's memory by category after
// every step.
#include "scenarios.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>

import meshrt;

using namespace meshrt;

namespace meshrt_demo {

namespace {

// The inputs as a bfloat16 device holds them, so that host math starts from the same values.
HostTensor random_tensor(const TensorShape& shape, std::uint32_t seed) {
  HostTensor host = random_host_tensor(shape, seed);
  for (float& v : host.values) v = round_to(DataType::bfloat16, v);
  return host;
}

// bfloat16 keeps 8 significant bits: a result within 2^-7 of the host's (plus a little near 0).
std::uint64_t mismatches(const std::vector<float>& got, const std::vector<float>& want) {
  std::uint64_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= 2e-2F + std::fabs(want[i]) / 128)) ++bad;
  }
  return bad + (got.size() == want.size() ? 0 : 1);
}

std::vector<float> host_add(const HostTensor& a, const HostTensor& b) {
  std::vector<float> sum(a.values.size());
  for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = a.values[i] + b.values[i];
  return sum;
}

std::vector<float> host_matmul(const HostTensor& a, const HostTensor& b) {
  const std::uint64_t batch = a.shape.batch();
  const std::uint64_t m = a.shape.height();
  const std::uint64_t k = a.shape.width();
  const std::uint64_t n = b.shape.width();
  std::vector<float> z(batch * m * n, 0.0F);
  for (std::uint64_t bi = 0; bi < batch; ++bi) {
    for (std::uint64_t i = 0; i < m; ++i) {
      for (std::uint64_t p = 0; p < k; ++p) {
        const float x = a.values[(bi * m + i) * k + p];
        for (std::uint64_t j = 0; j < n; ++j) z[(bi * m + i) * n + j] += x * b.values[(bi * k + p) * n + j];
      }
    }
  }
  return z;
}

class Scenario {
 public:
  Scenario(const TensorScenarioOptions& options, std::shared_ptr<LiveBufferTable> live)
      : options_(options), live_(std::move(live)) {}

  // One step done: the figures, then the hold.
  void step(const MeshDevice& mesh, std::string_view what) {
    fmt::print("step {}: {}\n", ++steps_, what);
    print_figures(mesh);
    if (options_.hold_seconds > 0) {
      fmt::print("  holding after step {} for {} s (pid {}; SIGUSR1 goes on)\n", steps_, options_.hold_seconds,
                 static_cast<long>(::getpid()));
      std::fflush(stdout);
      hold(options_.hold_seconds);
    }
  }

 private:
  void print_figures(const MeshDevice& mesh) const {
    fmt::print("  {:>6}  {:>5}  {:>12}  {:>12}  {:>12}  {:>10}  {:>15}\n", "device", "type", "used bytes", "buffer",
               "system", "program", "circular_buffer");
    for (std::uint32_t index = 0; index < mesh.device_count(); ++index) {
      for (const BufferType type : {BufferType::dram, BufferType::l1}) {
        const auto of = [&](AllocationCategory category) { return live_->summary(DeviceId{index}, type, category).bytes; };
        fmt::print("  {:>6}  {:>5}  {:>12}  {:>12}  {:>12}  {:>10}  {:>15}\n", index, to_string(type),
                   live_->summary(DeviceId{index}, type).bytes, of(AllocationCategory::buffer),
                   of(AllocationCategory::system), of(AllocationCategory::program),
                   of(AllocationCategory::circular_buffer));
      }
    }
  }

  const TensorScenarioOptions& options_;
  std::shared_ptr<LiveBufferTable> live_;
  std::uint32_t steps_{};
};

// One run of the seed's test; false (having said why) on any Error or wrong result.
bool run_once(const TensorScenarioOptions& options, MeshShape shape, const DeviceSpec& spec,
              const std::shared_ptr<Tracker>& tracker, const std::shared_ptr<LiveBufferTable>& live) {
  Scenario scenario(options, live);
  const auto failed = [](std::string_view what, const Error& error) {
    fmt::print(stderr, "meshrt-demo: {}: {}\n", what, error.message);
    return false;
  };
  auto opened = MeshDevice::create(shape, spec, tracker);
  if (!opened) return failed("opening the mesh", opened.error());
  MeshDevice& mesh = *opened;
  scenario.step(mesh, fmt::format("opened a {} mesh of {}", to_string(shape), spec.name));

  const MeshMapperConfig mapper{.placements = {PlacementShard{0}, PlacementShard{1}}, .mesh_shape = shape};
  const MeshComposerConfig composer{.dims = {0, 1}, .mesh_shape = shape};
  const auto upload = [&](const HostTensor& host, std::string name) {
    return Tensor::from_host(mesh, host, DataType::bfloat16, Layout::tile, mapper, std::move(name));
  };
  const std::uint32_t side = 512 / options.scale_down;
  const std::uint32_t inner = 128 / options.scale_down;
  const std::uint32_t outer = 256 / options.scale_down;
  const HostTensor host_a = random_tensor({8, 8, side, side}, 1);
  const HostTensor host_b = random_tensor({8, 8, side, side}, 2);
  auto a = upload(host_a, "a");
  if (!a) return failed("distributing tensor a", a.error());
  scenario.step(mesh, fmt::format("tensor a {} bfloat16, sharded on dims 0 and 1: {} per device",
                                  to_string(host_a.shape), to_string(a->shard_spec().shape)));
  auto b = upload(host_b, "b");
  if (!b) return failed("distributing tensor b", b.error());
  scenario.step(mesh, "tensor b, the same way");

  auto sum = add(mesh, *a, *b, "a + b");
  if (!sum) return failed("add", sum.error());
  auto sum_back = sum->to_host(composer);
  if (!sum_back) return failed("reading a + b back", sum_back.error());
  if (const auto bad = mismatches(sum_back->values, host_add(host_a, host_b)); bad != 0) {
    fmt::print(stderr, "meshrt-demo: add: {} of {} values differ from the host's beyond bfloat16 precision\n", bad,
               sum_back->values.size());
    return false;
  }
  scenario.step(mesh, fmt::format("add: {} values match the host within bfloat16 precision", sum_back->values.size()));

  const HostTensor host_x = random_tensor({8, 8, outer, inner}, 3);
  const HostTensor host_y = random_tensor({8, 8, inner, outer}, 4);
  auto x = upload(host_x, "x");
  if (!x) return failed("distributing tensor x", x.error());
  auto y = upload(host_y, "y");
  if (!y) return failed("distributing tensor y", y.error());
  auto product = matmul(mesh, *x, *y, "x @ y");
  if (!product) return failed("matmul", product.error());
  auto product_back = product->to_host(composer);
  if (!product_back) return failed("reading x @ y back", product_back.error());
  if (const auto bad = mismatches(product_back->values, host_matmul(host_x, host_y)); bad != 0) {
    fmt::print(stderr, "meshrt-demo: matmul: {} of {} values differ from the host's beyond bfloat16 precision\n", bad,
               product_back->values.size());
    return false;
  }
  scenario.step(mesh, fmt::format("matmul {} @ {}: {} values match the host", to_string(host_x.shape),
                                  to_string(host_y.shape), product_back->values.size()));

  for (auto& [name, tensor] : {std::pair<std::string_view, Tensor*>{"a", &*a}, {"b", &*b}, {"a + b", &*sum},
                               {"x", &*x}, {"y", &*y}, {"x @ y", &*product}}) {
    const std::uint64_t bytes = tensor->bytes_per_device();
    tensor->deallocate();
    scenario.step(mesh, fmt::format("deallocated {} ({} bytes per device)", name, bytes));
  }
  const ProgramCacheStatistics cache = mesh.program_cache().statistics();
  mesh.disable_and_clear_program_cache();
  scenario.step(mesh, fmt::format("cleared the program cache: {} programs, {} bytes of binaries per device",
                                  cache.entries, cache.bytes_per_device));
  mesh.close();
  scenario.step(mesh, "closed the mesh: its system buffers went last");
  return true;
}

}  // namespace

int run_tensor_scenario(const TensorScenarioOptions& options) {
  const auto shape = parse_mesh(options.mesh);
  auto spec = DeviceSpec::named(options.device);
  if (!shape || !spec) {
    fmt::print(stderr, "meshrt-demo: {}\n", (!shape ? shape.error() : spec.error()).message);
    return 2;
  }
  auto tracker = Tracker::process_default();
  auto live = std::make_shared<LiveBufferTable>();
  tracker->add_processor(live);
  fmt::print("meshrt-demo: the seed's tensor test on a {} mesh ({}) of {}, {} iteration{}\n", options.mesh,
             to_string(*shape), spec->name, options.iterations, options.iterations == 1 ? "" : "s");
  for (std::uint32_t iteration = 1; iteration <= options.iterations; ++iteration) {
    fmt::print("iteration {}/{}\n", iteration, options.iterations);
    if (!run_once(options, *shape, *spec, tracker, live)) return 1;
    if (live->active_allocations() != 0) {
      fmt::print(stderr, "meshrt-demo: {} allocations still live after iteration {}\n", live->active_allocations(),
                 iteration);
      return 1;
    }
  }
  return end_of_run(live->active_allocations(), live->unknown_frees(), live->duplicate_allocations());
}

}  // namespace meshrt_demo
