// Code that must not compile against an installed meshrt: each variant names something the
// buffer state machine relies on (check.cmake builds each and expects the compiler to refuse
// it, naming what it could not reach). If one compiled, an application could take or give back
// memory behind the state machine's back, and exactly-once would be a convention (ADR 0019).
import meshrt;

int main() {
  auto mesh = meshrt::MeshDevice::create({1, 1});
#if defined(REACH_MESH_MEMORY)
  meshrt::detail::MeshMemory* reached = nullptr;
#elif defined(REACH_MEMORY_ACCESSOR)
  auto reached = mesh->memory();
#elif defined(REACH_MESH_ACCESS)
  auto reached = meshrt::detail::MeshAccess::memory(*mesh);
#elif defined(REACH_BUFFER_ALLOCATION)
  meshrt::detail::BufferAllocation* reached = nullptr;
#elif defined(REACH_MESH_RESIDENT)
  meshrt::detail::MeshResident* reached = nullptr;
#endif
  return reached == nullptr ? 0 : 1;
}
