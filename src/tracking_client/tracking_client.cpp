// TrackingClient's public face: start, record (the application threads' only cost), describe,
// flush, status, and what a fork's child does with a parent's client (ADR 0017). The inside is
// in client_engine.cppm and the files it names.
module;
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

module meshrt.tracking_client;

import meshrt.core;
import meshrt.protocol;
import :client_engine;
import :event_lanes;
import :fork_handling;

namespace meshrt {

namespace {

// The client client_from_environment() started for Tracker::process_default(), once it has.
std::mutex environment_client_mutex;
std::weak_ptr<TrackingClient> environment_client;

std::string own_process_name() {
  std::ifstream file("/proc/self/comm");
  std::string name;
  std::getline(file, name);
  return name.substr(0, protocol::max_name_size);
}

}  // namespace

std::shared_ptr<EventProcessor> detail::client_from_environment() {
  if (!tracking_enabled_by_environment()) return nullptr;
  auto client = TrackingClient::start({});
  const std::scoped_lock lock(environment_client_mutex);
  environment_client = client;
  return client;
}

std::shared_ptr<TrackingClient> process_tracking_client() {
  (void)Tracker::process_default();  // made on first use: make it now
  const std::scoped_lock lock(environment_client_mutex);
  return environment_client.lock();
}

bool stacks_enabled_by_environment() {
  const char* value = std::getenv("MESHRT_ALLOC_STACKS");
  return value != nullptr && std::string_view(value) == "1";
}

bool tracking_enabled_by_environment() {
  for (const char* variable : {"MESHRT_ALLOC_TRACKING", "TT_ALLOC_TRACKING_ENABLED"}) {
    if (const char* value = std::getenv(variable); value != nullptr && std::string_view(value) == "1") return true;
  }
  return false;
}

std::shared_ptr<TrackingClient> TrackingClient::start(Options options) {
  detail::install_fork_handlers();
  if (options.socket_path.empty()) options.socket_path = protocol::default_socket_path();
  if (options.process_name.empty()) options.process_name = own_process_name();
  auto engine = std::make_unique<Engine>();
  engine->options = std::move(options);
  if (engine->options.capture_stacks) {
    engine->interner = std::make_unique<detail::StackInterner>(engine->options.max_stacks);
    engine->stack_book = std::make_unique<detail::StackBook>();
  }
  Engine& s = *engine;
  auto client = std::shared_ptr<TrackingClient>(new TrackingClient(std::move(engine)));
  s.sender = std::make_unique<std::thread>([&s] { s.run(); });
  return client;
}

TrackingClient::TrackingClient(std::unique_ptr<Engine> engine) : engine_(std::move(engine)) {}

TrackingClient::~TrackingClient() {
  if (engine_->forked_away()) {
    // A fork's child: the sender thread is the parent's (its std::thread would terminate the
    // process if destroyed joinable), and any lock may have been held by one of the parent's
    // threads at the fork. The child's copy is left as it is, never freed.
    (void)engine_.release();  // NOLINT(bugprone-unused-return-value): deliberately never freed
    return;
  }
  shutdown();
}

void TrackingClient::shutdown() {
  if (engine_->forked_away()) return;  // the parent's to do
  {
    const std::scoped_lock lock(engine_->mutex);
    engine_->stopping.store(true, std::memory_order_release);
  }
  engine_->wake.notify_one();
  if (engine_->sender && engine_->sender->joinable()) engine_->sender->join();
  engine_->lanes.close();  // no thread may wait for a chunk the sender will never give back
}

void TrackingClient::process(std::span<const AllocationEvent> events) noexcept {
  if (engine_->stopping.load(std::memory_order_relaxed) || engine_->forked_away()) return;
  const detail::LaneLease lease = engine_->lanes.for_this_thread();
  if (lease.lane == nullptr) return;
  detail::Lane& lane = *lease.lane;
  // One stack for the whole call: every event of one record() came from the same place.
  std::uint32_t stack = 0;
  if (engine_->interner) {
    for (const AllocationEvent& event : events) {
      if (event.kind != EventKind::allocate) continue;
      stack = engine_->interner->intern_current();
      break;
    }
  }
  // No wake-up for the sender here: it runs every flush interval and reads whole chunks; woken
  // as chunks fill, it reads lines this thread is writing (29 against 19 ns per event).
  for (const AllocationEvent& event : events) {
    detail::Chunk* chunk = lane.tail;
    const std::size_t at = chunk->published.load(std::memory_order_relaxed);  // only we write it
    if (at == detail::Chunk::capacity) {
      detail::Chunk* fresh = engine_->lanes.take_next();
      if (fresh == nullptr) return;  // shutting down: the last events go unrecorded
      chunk->next.store(fresh, std::memory_order_release);
      lane.tail = fresh;
      fresh->record(0, event, event.kind == EventKind::allocate ? stack : 0);
      fresh->published.store(1, std::memory_order_release);
      continue;
    }
    chunk->record(at, event, event.kind == EventKind::allocate ? stack : 0);
    chunk->published.store(at + 1, std::memory_order_release);
  }
  lane.queued.store(lane.queued.load(std::memory_order_relaxed) + events.size(), std::memory_order_relaxed);
}

void TrackingClient::describe_devices(std::span<const DeviceDescription> devices) noexcept {
  if (engine_->forked_away()) return;
  const std::scoped_lock lock(engine_->mutex);
  for (const DeviceDescription& device : devices) {
    engine_->device_queue.push_back({device.device.value(), device.total_bytes, device.bank_count, device.base_address});
  }
}

void TrackingClient::report_out_of_memory(const OutOfMemoryReport& report) noexcept {
  if (engine_->forked_away()) return;
  try {
    const std::scoped_lock lock(engine_->mutex);
    auto& queue = engine_->out_of_memory_queue;
    if (queue.size() >= Engine::max_out_of_memory_queued) queue.erase(queue.begin());
    queue.push_back({.device = report.device.value(),
                     .type = report.type,
                     .requested = report.requested,
                     .largest_free_block = report.largest_free_block,
                     .message = std::string(report.message.substr(0, protocol::max_out_of_memory_message))});
    engine_->wake.notify_one();
  } catch (...) {  // NOLINT(bugprone-empty-catch): out of host memory too; the Error still reaches the caller
  }
}

void TrackingClient::describe_mesh_buffer(MeshBufferId mesh_buffer, std::string_view name) noexcept {
  if (engine_->forked_away()) return;
  const std::scoped_lock lock(engine_->mutex);
  engine_->name_queue.insert_or_assign(mesh_buffer.value(), std::string(name.substr(0, protocol::max_name_size)));
  engine_->names_queued.store(engine_->name_queue.size(), std::memory_order_release);
}

bool TrackingClient::flush(std::chrono::milliseconds timeout) {
  if (engine_->forked_away()) return false;
  std::unique_lock lock(engine_->mutex);
  if (engine_->stopping.load(std::memory_order_relaxed)) return false;
  const std::uint64_t request = ++engine_->flush_requests;
  engine_->wake.notify_one();
  return engine_->delivered_changed.wait_for(lock, timeout, [&] { return engine_->flushed_through >= request; });
}

bool TrackingClient::captures_stacks() const noexcept { return engine_->interner != nullptr; }

TrackingClient::Status TrackingClient::status() const {
  if (engine_->forked_away()) return Status{};
  Status status;
  {
    const std::scoped_lock lock(engine_->mutex);
    status = engine_->status;
  }
  status.events_queued = engine_->lanes.events_queued();
  return status;
}

}  // namespace meshrt
