// A small model of the runtime the seed report came from: mesh buffers whose state lives in a
// std::variant, device buffers behind shared pointers, a weak pointer to the mesh device.
#pragma once
#include <atomic>
#include <memory>
#include <variant>
#include <vector>

struct MeshDevice {};

struct Buffer {
  static std::unique_ptr<Buffer> create();
  void deallocate();
  void mark_as_deallocated();
};

struct OwnedState {};
struct DeallocatedState {};

class MeshBuffer {
 public:
  MeshBuffer();
  ~MeshBuffer();
  void deallocate();
  void mark_deallocated();
  bool is_allocated() const;
  std::variant<OwnedState, DeallocatedState> state_;

 private:
  std::weak_ptr<MeshDevice> mesh_device_;
  std::vector<std::shared_ptr<Buffer>> buffers_;
};

enum class State { allocated, deallocated, device_closed };

class Allocation {
 public:
  void mark_device_closed(int slot);
  void sneaky(int slot);

 private:
  std::atomic<State> states_[4];
};
