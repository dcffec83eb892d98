// Every option a project may point at its own types shows in --dump-config, with its default.
// RUN: %clang_tidy --config='{}' --checks='-*,meshrt-*' --dump-config | FileCheck %s

// CHECK-DAG: meshrt-state-transition.StateMembers: '::meshrt::detail::BufferAllocation::states_'
// CHECK-DAG: meshrt-state-transition.TransitionFunctions: '::meshrt::detail::BufferAllocation::mark_deallocated;::meshrt::detail::BufferAllocation::mark_device_closed'
// CHECK-DAG: meshrt-state-transition.StateSetters: mark_as_deallocated
// CHECK-DAG: meshrt-state-transition.AllowInConstructors: 'true'
// CHECK-DAG: meshrt-deallocate-on-every-path.DeallocatingFunctions: 'deallocate;::meshrt::MeshDevice::close'
// CHECK-DAG: meshrt-deallocate-on-every-path.DeallocationCalls: '::meshrt::MeshBuffer::deallocate_for;::meshrt::DeviceBuffer::deallocate_for;::meshrt::MeshBuffer::deallocate;::meshrt::DeviceBuffer::deallocate;::meshrt::MeshDevice::close'
// CHECK-DAG: meshrt-deallocate-on-every-path.ReleasePrimitives: '::meshrt::detail::BufferAllocation::deallocate_slots;::meshrt::detail::MeshMemory::close'
// CHECK-DAG: meshrt-deallocate-on-every-path.OwnedTypes: '::meshrt::detail::BufferAllocation'
// CHECK-DAG: meshrt-deallocate-on-every-path.CheckDestructors: 'true'
// CHECK-DAG: meshrt-deallocate-on-every-path.CheckMoveAssignments: 'true'
// CHECK-DAG: meshrt-ownership-escape.BufferTypes: '::meshrt::DeviceBuffer;::meshrt::MeshBuffer;::meshrt::detail::BufferAllocation'
// CHECK-DAG: meshrt-ownership-escape.AllowedFactories: '::meshrt::DeviceBuffer::create;::meshrt::MeshBuffer::create;::meshrt::detail::BufferAllocation::allocate'
// CHECK-DAG: meshrt-discarded-handle.HandleTypes: '::meshrt::DeviceBuffer;::meshrt::MeshBuffer'
