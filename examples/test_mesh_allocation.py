#!/usr/bin/python3
"""The seed's test_mesh_allocation.py in meshrt's Python API, step for step.

Opens a 2x4 mesh, distributes two (8, 8, 512, 512) bfloat16 tensors sharded on dims 0 and 1, adds
them, multiplies (8, 8, 256, 128) by (8, 8, 128, 256), checks both against torch, deallocates
the tensors one by one, clears the program cache and closes the mesh, printing each device's
DRAM and L1 in use after every step. Run it against an allocation server to watch it there:

    build/dev/bin/meshrt-alloc-server &
    MESHRT_ALLOC_TRACKING=1 PYTHONPATH=build/dev/python /usr/bin/python3 examples/test_mesh_allocation.py
    build/dev/bin/meshrt-smi        # in another terminal, while it holds (--hold)

--hold S pauses S seconds after each step (SIGUSR1 goes on at once), as meshrt-demo --hold does.
"""
import argparse
import os
import signal
import sys
import threading

import torch

import meshrt

resume = threading.Event()


def hold(seconds, step):
    if seconds <= 0:
        return
    print(f"  holding after step {step} for {seconds} s (pid {os.getpid()}; SIGUSR1 goes on)", flush=True)
    resume.wait(seconds)
    resume.clear()


def figures(mesh):
    print(f"  {'device':>6}  {'DRAM allocated':>16}  {'L1 allocated':>14}")
    for device in range(mesh.get_num_devices()):
        used = []
        for kind in (meshrt.BufferType.DRAM, meshrt.BufferType.L1):
            view = meshrt.get_memory_view(mesh, device, kind)
            used.append(view.total_bytes_allocated_per_bank * view.num_banks)
        print(f"  {device:>6}  {used[0]:>16}  {used[1]:>14}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", type=float, default=0, help="seconds to pause after each step (SIGUSR1 ends it)")
    parser.add_argument("--scale-down", type=int, default=1, choices=[1, 2, 4, 8],
                        help="divide the last two dims of every tensor by this (1: the seed's shapes)")
    args = parser.parse_args()
    signal.signal(signal.SIGUSR1, lambda *_: resume.set())
    torch.manual_seed(0)
    step = 0

    def done(what, mesh=None):
        nonlocal step
        step += 1
        print(f"step {step}: {what}", flush=True)
        if mesh is not None and mesh.is_open():
            figures(mesh)
        hold(args.hold, step)

    shape = meshrt.MeshShape(2, 4)
    mesh = meshrt.open_mesh_device(shape, spec="wormhole_b0")
    done("opened a 2x4 mesh of wormhole_b0", mesh)
    mapper = meshrt.create_mesh_mapper(mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0),
                                                                      meshrt.PlacementShard(1)], shape))
    composer = meshrt.create_mesh_composer(mesh, meshrt.MeshComposerConfig([0, 1], shape))

    def upload(t):
        return meshrt.from_torch(t, dtype=meshrt.bfloat16, layout=meshrt.TILE_LAYOUT, device=mesh, mesh_mapper=mapper)

    side, inner, outer = 512 // args.scale_down, 128 // args.scale_down, 256 // args.scale_down
    host_a, host_b = torch.rand(8, 8, side, side), torch.rand(8, 8, side, side)
    a = upload(host_a)
    done(f"tensor a {tuple(host_a.shape)} bfloat16, {a.shard_shape} per device", mesh)
    b = upload(host_b)
    done("tensor b, the same way", mesh)

    total = meshrt.add(a, b)
    expected = host_a.to(torch.bfloat16).float() + host_b.to(torch.bfloat16).float()
    if not torch.allclose(meshrt.to_torch(total, mesh_composer=composer).float(), expected, rtol=1 / 128, atol=2e-2):
        sys.exit("test_mesh_allocation: add differs from torch beyond bfloat16 precision")
    done("add: matches torch within bfloat16 precision", mesh)

    host_x, host_y = torch.rand(8, 8, outer, inner), torch.rand(8, 8, inner, outer)
    x, y = upload(host_x), upload(host_y)
    product = meshrt.matmul(x, y)
    expected = host_x.to(torch.bfloat16).float() @ host_y.to(torch.bfloat16).float()
    got = meshrt.to_torch(product, mesh_composer=composer).float()
    if not torch.allclose(got, expected, rtol=1 / 64, atol=0.25):
        sys.exit("test_mesh_allocation: matmul differs from torch beyond bfloat16 precision")
    done(f"matmul {tuple(host_x.shape)} @ {tuple(host_y.shape)}: matches torch", mesh)

    for name, t in [("a", a), ("b", b), ("a + b", total), ("x", x), ("y", y), ("x @ y", product)]:
        size = t.bytes_per_device
        meshrt.deallocate(t)
        done(f"deallocated {name} ({size} bytes per device)", mesh)
    entries = mesh.num_program_cache_entries()
    mesh.disable_and_clear_program_cache()
    done(f"cleared the program cache ({entries} programs)", mesh)
    meshrt.close_mesh_device(mesh)
    done("closed the mesh: its system buffers went last")
    if meshrt.tracking_enabled() and not meshrt.flush_tracking(30.0):
        sys.exit("test_mesh_allocation: the allocation server did not take every event")
    print("test_mesh_allocation: passed")


if __name__ == "__main__":
    main()
