// The consumer of an installed meshrt: a 2x4 mesh, one replicated DRAM buffer, its figures.
#include <cstdio>
#include <memory>
#include <string>

import meshrt;

int main() {
  using namespace meshrt;
  auto tracker = std::make_shared<Tracker>();
  auto live = std::make_shared<LiveBufferTable>();
  tracker->add_processor(live);
  auto mesh = MeshDevice::create(mesh_preset("t3000").value(), DeviceSpec::wormhole_b0(), tracker);
  if (!mesh) return std::fprintf(stderr, "%s\n", mesh.error().message.c_str()), 1;
  const auto ours = [&] { return static_cast<unsigned long long>(live->active_allocations(AllocationCategory::buffer)); };
  {
    auto buffer = MeshBuffer::create(*mesh,
                                     ReplicatedBufferConfig{.size = 1 << 20, .name = "weights"},
                                     DeviceLocalBufferConfig{.page_size = 2048, .buffer_type = BufferType::dram});
    if (!buffer) return std::fprintf(stderr, "%s\n", buffer.error().message.c_str()), 1;
    std::printf("meshrt %s: %llu device buffers live\n", std::string(runtime_version).c_str(), ours());
  }
  std::printf("after the buffer's scope: %llu live, %llu system buffers\n", ours(),
              static_cast<unsigned long long>(live->active_allocations(AllocationCategory::system)));
  mesh->close();  // the system buffers go last
  std::printf("after close: %llu live\n", static_cast<unsigned long long>(live->active_allocations()));
  return live->active_allocations() == 0 ? 0 : 1;
}
