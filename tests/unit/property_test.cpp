// Random sequences of create / deallocate / move / destroy / close on random meshes: whatever
// happens, every buffer id gets exactly one Alloc and one Free, each device's allocators hold
// what the tracker has live on that device (lone device buffers included), and the allocators
// end empty. Both allocator policies, both directions.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

import meshrt;
import meshrt.testing;

using namespace meshrt;

namespace {

class Scenario {
 public:
  explicit Scenario(std::uint64_t seed) : random_(seed) {
    tracker_->add_processor(log_);
    tracker_->add_processor(live_);
    const MeshShape shape{pick(1, 8), pick(1, 8)};
    DeviceSpec spec = testing::without_system_buffers(DeviceSpec::wormhole_b0(testing::every_region));
    spec.allocator_policy = seed % 2 == 0 ? AllocatorPolicy::first_fit : AllocatorPolicy::best_fit;
    mesh_.emplace(MeshDevice::create(shape, spec, tracker_).value());
  }

  void step() {
    switch (pick(0, 9)) {
      case 0: case 1: case 2: create_mesh_buffer(); break;
      case 3: create_device_buffer(); break;
      case 4: deallocate_something(); break;
      case 5: move_something(); break;
      case 6: destroy_something(); break;
      case 7: take_device_buffer_out(); break;
      case 8: write_something(); break;
      case 9: if (pick(0, 5) == 0) close_mesh(); break;
    }
    // Between steps, the tracker's view equals what the handles say is allocated, and each
    // device's allocators hold exactly the footprint the tracker has live on that device.
    REQUIRE(live_->active_allocations() == allocated_device_buffers());
    // (Every fifth step: the check reads every device's allocators and the tracker's table.)
    if (mesh_open_ && ++steps_ % 5 == 0) check_allocators_match_tracker();
  }

  void check_allocators_match_tracker() const {
    for (std::uint32_t device = 0; device < mesh_->device_count(); ++device) {
      for (const BufferType type : all_buffer_types) {
        std::uint64_t per_bank = 0;
        const auto live = live_->live_buffers(DeviceId{device}, type);
        for (const AllocationEvent& event : live) per_bank += event.footprint / mesh_->spec().layout(type).bank_count;
        const AllocatorStatistics stats = mesh_->allocator_statistics(DeviceId{device}, type).value();
        CAPTURE(device);
        CAPTURE(to_string(type));
        REQUIRE(stats.allocated_bytes == per_bank);
        REQUIRE(stats.allocated_blocks == live.size());
      }
    }
  }

  void finish() {
    if (mesh_open_) {
      mesh_buffers_.clear();
      device_buffers_.clear();
      for (std::uint32_t device = 0; device < mesh_->device_count(); ++device) {
        for (const BufferType type : all_buffer_types) {
          CAPTURE(device);
          CAPTURE(to_string(type));
          REQUIRE(mesh_->allocator_statistics(DeviceId{device}, type).value().allocated_bytes == 0);
          REQUIRE(mesh_->allocator_statistics(DeviceId{device}, type).value().allocated_blocks == 0);
        }
      }
      mesh_.reset();
    } else {
      mesh_.reset();
      mesh_buffers_.clear();
      device_buffers_.clear();
    }
    const auto audit = log_->audit();
    REQUIRE(audit.double_allocs == 0);
    REQUIRE(audit.double_frees == 0);
    REQUIRE(audit.unknown_frees == 0);
    REQUIRE(audit.still_live == 0);
    REQUIRE(live_->active_allocations() == 0);
    REQUIRE(live_->unknown_frees() == 0);
    buffers_seen += audit.buffers;
  }

  std::uint64_t buffers_seen = 0;

 private:
  std::uint32_t pick(std::uint32_t low, std::uint32_t high) {
    return std::uniform_int_distribution<std::uint32_t>(low, high)(random_);
  }

  DeviceLocalBufferConfig device_config() {
    std::optional<bool> bottom_up;
    if (pick(0, 2) == 0) bottom_up = pick(0, 1) == 0;
    return {.page_size = std::uint64_t{16} << pick(0, 8), .buffer_type = all_buffer_types[pick(0, 3)],
            .bottom_up = bottom_up};
  }

  void create_mesh_buffer() {
    const DeviceLocalBufferConfig config = device_config();
    const MeshShape shape = mesh_->shape();
    Result<MeshBuffer> buffer = [&]() -> Result<MeshBuffer> {
      if (pick(0, 1) == 0) {
        return MeshBuffer::create(*mesh_, ReplicatedBufferConfig{.size = config.page_size * pick(0, 40)}, config);
      }
      // Shards of one page each (element = 1 byte): shard shape 1 x page_size.
      const Shape2D shard{1, config.page_size};
      return MeshBuffer::create(*mesh_,
                                ShardedBufferConfig{.global_size = shape.device_count() * config.page_size,
                                                    .global_shape = {shape.rows, shape.cols * config.page_size},
                                                    .shard_shape = shard},
                                config);
    }();
    if (!mesh_open_) {
      REQUIRE_FALSE(buffer.has_value());
      return;
    }
    REQUIRE(buffer.has_value());
    mesh_buffers_.push_back(std::move(*buffer));
  }

  void create_device_buffer() {
    const DeviceLocalBufferConfig config = device_config();
    const MeshCoordinate at = mesh_->shape().coordinate_of(pick(0, mesh_->device_count() - 1));
    auto buffer = DeviceBuffer::create(*mesh_, at, config.page_size * pick(1, 20), config);
    if (!mesh_open_) {
      REQUIRE_FALSE(buffer.has_value());
      return;
    }
    REQUIRE(buffer.has_value());
    device_buffers_.push_back(std::move(*buffer));
  }

  void deallocate_something() {
    if (!mesh_buffers_.empty() && pick(0, 1) == 0) {
      mesh_buffers_[pick(0, static_cast<std::uint32_t>(mesh_buffers_.size() - 1))].deallocate();
    } else if (!device_buffers_.empty()) {
      device_buffers_[pick(0, static_cast<std::uint32_t>(device_buffers_.size() - 1))].deallocate();
    }
  }

  void move_something() {
    if (!mesh_buffers_.empty() && pick(0, 1) == 0) {
      const auto from = pick(0, static_cast<std::uint32_t>(mesh_buffers_.size() - 1));
      const auto to = pick(0, static_cast<std::uint32_t>(mesh_buffers_.size() - 1));
      mesh_buffers_[to] = std::move(mesh_buffers_[from]);  // self-move included: must be harmless
    } else if (!device_buffers_.empty()) {
      const auto from = pick(0, static_cast<std::uint32_t>(device_buffers_.size() - 1));
      const auto to = pick(0, static_cast<std::uint32_t>(device_buffers_.size() - 1));
      device_buffers_[to] = std::move(device_buffers_[from]);
    }
  }

  void destroy_something() {
    if (!mesh_buffers_.empty() && pick(0, 1) == 0) {
      mesh_buffers_.erase(mesh_buffers_.begin() + pick(0, static_cast<std::uint32_t>(mesh_buffers_.size() - 1)));
    } else if (!device_buffers_.empty()) {
      device_buffers_.erase(device_buffers_.begin() + pick(0, static_cast<std::uint32_t>(device_buffers_.size() - 1)));
    }
  }

  void take_device_buffer_out() {
    if (mesh_buffers_.empty()) return;
    MeshBuffer& source = mesh_buffers_[pick(0, static_cast<std::uint32_t>(mesh_buffers_.size() - 1))];
    if (source.device_buffers().empty()) return;  // moved from
    const auto handles = source.device_buffers();
    device_buffers_.push_back(std::move(handles[pick(0, static_cast<std::uint32_t>(handles.size() - 1))]));
  }

  void write_something() {
    if (mesh_buffers_.empty()) return;
    MeshBuffer& buffer = mesh_buffers_[pick(0, static_cast<std::uint32_t>(mesh_buffers_.size() - 1))];
    std::vector<std::byte> bytes(buffer.size(), std::byte{0x5A});
    const auto written = buffer.write(bytes);
    if (buffer.is_allocated() && buffer.type() != BufferType::trace) {
      REQUIRE(written.has_value());
      REQUIRE(buffer.read().value() == bytes);
    }
  }

  void close_mesh() {
    mesh_->close();
    mesh_open_ = false;
  }

  std::uint64_t allocated_device_buffers() const {
    std::uint64_t count = 0;
    for (const DeviceBuffer& buffer : device_buffers_) count += buffer.is_allocated() ? 1 : 0;
    for (const MeshBuffer& buffer : mesh_buffers_) {
      for (const DeviceBuffer& device_buffer : buffer.device_buffers()) count += device_buffer.is_allocated() ? 1 : 0;
    }
    return count;
  }

  std::mt19937_64 random_;
  std::uint64_t steps_ = 0;
  std::shared_ptr<Tracker> tracker_ = std::make_shared<Tracker>();
  std::shared_ptr<testing::EventLog> log_ = std::make_shared<testing::EventLog>();
  std::shared_ptr<LiveBufferTable> live_ = std::make_shared<LiveBufferTable>();
  std::optional<MeshDevice> mesh_;
  bool mesh_open_ = true;
  std::vector<MeshBuffer> mesh_buffers_;
  std::vector<DeviceBuffer> device_buffers_;
};

}  // namespace

TEST_SUITE("property") {
  TEST_CASE("random lifecycles: one Alloc and one Free per buffer id, allocators end empty") {
    constexpr std::uint64_t sequences = 2000;
    constexpr int steps = 40;
    std::uint64_t buffers = 0;
    for (std::uint64_t seed = 1; seed <= sequences; ++seed) {
      CAPTURE(seed);  // rerun one sequence by fixing this seed
      Scenario scenario(seed);
      for (int step = 0; step < steps; ++step) {
        CAPTURE(step);
        scenario.step();
      }
      scenario.finish();
      buffers += scenario.buffers_seen;
    }
    // The sequences must actually exercise the runtime, not pass by doing nothing.
    CHECK(buffers > sequences * 20);
  }
}
