"""meshrt-bench's Python figures (ADR 0023), printed as one JSON object on stdout:
python_buffer_us, creating and dropping one small MeshBuffer from Python (microseconds per pair),
and from_torch_gb_per_s, a 32 MiB bfloat16 tensor sharded onto a 2x4 mesh (bytes of the torch
tensor per second). Medians of repeated batches, after a warm-up."""
import json
import time

import torch

import meshrt


def median_seconds(batch, repetitions=9, warmups=2):
    for _ in range(warmups):
        batch()
    samples = []
    for _ in range(repetitions):
        start = time.perf_counter()
        batch()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def main():
    pairs = 20000
    with meshrt.open_mesh_device(meshrt.MeshShape(1, 1)) as mesh:
        def create_and_drop():
            for _ in range(pairs):
                meshrt.create_mesh_buffer(mesh, size=2048, page_size=2048)  # dropped at once: freed
        buffer_us = median_seconds(create_and_drop) / pairs * 1e6

    shape = meshrt.MeshShape(2, 4)
    with meshrt.open_mesh_device(shape) as mesh:
        mapper = meshrt.create_mesh_mapper(mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0),
                                                                          meshrt.PlacementShard(1)], shape))
        tensor = torch.rand(8, 8, 512, 512).to(torch.bfloat16)  # 32 MiB
        size = tensor.numel() * tensor.element_size()

        def place():
            meshrt.from_torch(tensor, dtype=meshrt.bfloat16, layout=meshrt.TILE_LAYOUT, device=mesh,
                              mesh_mapper=mapper).deallocate()
        gb_per_s = size / median_seconds(place, repetitions=5, warmups=1) / 1e9
    print(json.dumps({"python_buffer_us": buffer_us, "from_torch_gb_per_s": gb_per_s}))


if __name__ == "__main__":
    main()
