// The seed's tensor workload (ADR 0021): the whole scenario of meshrt-demo --scenario tensors,
// and the throughput of add on its tensors.
module;
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

module meshrt.bench;

import meshrt;

namespace meshrt::bench {

namespace {

struct SeedInputs {
  HostTensor a = random_host_tensor({8, 8, 512, 512}, 1);
  HostTensor b = random_host_tensor({8, 8, 512, 512}, 2);
  HostTensor x = random_host_tensor({8, 8, 256, 128}, 3);
  HostTensor y = random_host_tensor({8, 8, 128, 256}, 4);
};

void must(bool ok, const char* what) {
  if (!ok) {
    fmt::print(stderr, "meshrt-bench: the seed scenario failed at {}\n", what);
    std::abort();
  }
}

DeviceSpec seed_spec() {
  DeviceSpec spec = DeviceSpec::wormhole_b0();
  spec.system_buffers = SystemBuffers::defaults(spec.l1.bank_count);
  return spec;
}

// Every step of the seed's test but the host-side checking: open, distribute, add, matmul, read
// both results back, deallocate one by one, clear the cache, close. Tracked: every event reaches
// a live-buffer table, which must end empty.
void seed_scenario(const SeedInputs& inputs) {
  auto tracker = std::make_shared<Tracker>();
  auto live = std::make_shared<LiveBufferTable>();
  tracker->add_processor(live);
  const MeshShape shape{2, 4};
  auto mesh = MeshDevice::create(shape, seed_spec(), tracker);
  must(mesh.has_value(), "open");
  const MeshMapperConfig mapper{.placements = {PlacementShard{0}, PlacementShard{1}}, .mesh_shape = shape};
  const MeshComposerConfig composer{.dims = {0, 1}, .mesh_shape = shape};
  auto up = [&](const HostTensor& host) { return Tensor::from_host(*mesh, host, DataType::bfloat16, Layout::tile, mapper); };
  auto a = up(inputs.a);
  auto b = up(inputs.b);
  must(a && b, "distribute");
  auto sum = add(*mesh, *a, *b);
  must(sum && sum->to_host(composer).has_value(), "add");
  auto x = up(inputs.x);
  auto y = up(inputs.y);
  must(x && y, "distribute matmul operands");
  auto product = matmul(*mesh, *x, *y);
  must(product && product->to_host(composer).has_value(), "matmul");
  for (Tensor* t : {&*a, &*b, &*sum, &*x, &*y, &*product}) t->deallocate();
  mesh->disable_and_clear_program_cache();
  mesh->close();
  must(live->active_allocations() == 0, "close (allocations left live)");
}

}  // namespace

std::vector<Figure> workload_figures() {
  const SeedInputs inputs;
  const double scenario_ns = median_ns_per_op([&] { seed_scenario(inputs); }, 1, 3, 1);

  auto mesh = MeshDevice::create({2, 4}, DeviceSpec::wormhole_b0(), std::make_shared<Tracker>()).value();
  const MeshMapperConfig mapper{.placements = {PlacementShard{0}, PlacementShard{1}}, .mesh_shape = {2, 4}};
  const auto a = Tensor::from_host(mesh, inputs.a, DataType::bfloat16, Layout::tile, mapper).value();
  const auto b = Tensor::from_host(mesh, inputs.b, DataType::bfloat16, Layout::tile, mapper).value();
  const double add_ns = median_ns_per_op([&] { must(add(mesh, a, b).has_value(), "add"); }, 1, 7, 1);
  const double operand_bytes = static_cast<double>(2 * a.bytes_per_device() * mesh.device_count());
  return {
      figure("seed_scenario_ms", scenario_ns / 1e6, "ms", Bound::at_most, 3000),
      figure("tensor_add_gb_per_s", operand_bytes / add_ns, "GB/s", Bound::at_least, 0.5),
  };
}

}  // namespace meshrt::bench
