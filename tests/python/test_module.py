"""meshrt for Python, used as a ttnn user would: meshes, tensors from torch, add and matmul
against torch, deallocation, the program cache, memory views, raw buffers, and errors that
raise meshrt.Error instead of crashing the interpreter."""
import gc

import numpy
import pytest
import torch

import meshrt

KIB = 1024
MIB = 1024 * KIB


def sharded(mesh):
    shape = mesh.shape
    return meshrt.create_mesh_mapper(
        mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0), meshrt.PlacementShard(1)], shape))


def composed(mesh):
    return meshrt.create_mesh_composer(mesh, meshrt.MeshComposerConfig([0, 1], mesh.shape))


def dram_used(mesh, device=0):
    view = meshrt.get_memory_view(mesh, device, meshrt.BufferType.DRAM)
    return view.total_bytes_allocated_per_bank * view.num_banks


def test_names_a_ttnn_user_looks_for():
    for name in ["open_mesh_device", "close_mesh_device", "MeshShape", "from_torch", "to_torch", "from_numpy",
                 "to_numpy", "create_mesh_mapper", "MeshMapperConfig", "PlacementShard", "PlacementReplicate",
                 "distribute_tensor", "create_mesh_composer", "MeshComposerConfig", "add", "matmul", "deallocate",
                 "get_memory_view", "BufferType", "bfloat16", "float32", "TILE_LAYOUT", "ROW_MAJOR_LAYOUT",
                 "create_mesh_buffer", "Error"]:
        assert hasattr(meshrt, name), name
        assert getattr(meshrt, name).__doc__ or name in ("bfloat16", "float32", "TILE_LAYOUT", "ROW_MAJOR_LAYOUT")
    assert "open_mesh_device" in meshrt.__doc__


def test_a_mesh_opens_with_its_system_buffers_and_closes_as_a_context_manager():
    with meshrt.open_mesh_device(meshrt.MeshShape(2, 4), spec="wormhole_b0") as mesh:
        assert mesh.is_open()
        assert mesh.get_num_devices() == 8
        assert mesh.shape == meshrt.MeshShape(2, 4)
        # 8 MiB of command queue and 6 MiB of dispatch buffers per device, rounded to whole pages per bank.
        assert dram_used(mesh) >= 14 * MIB
    assert not mesh.is_open()


def test_tensors_round_trip_through_a_sharded_mesh():
    with meshrt.open_mesh_device(meshrt.MeshShape(2, 4)) as mesh:
        host = torch.rand(4, 8, 64, 96)
        before = dram_used(mesh)
        t = meshrt.from_torch(host, dtype=meshrt.bfloat16, layout=meshrt.TILE_LAYOUT, device=mesh,
                              mesh_mapper=sharded(mesh))
        assert t.shape == (4, 8, 64, 96)
        assert t.shard_shape == (2, 2, 64, 96)
        assert t.bytes_per_device == 2 * 2 * 64 * 96 * 2
        assert dram_used(mesh) - before >= t.bytes_per_device
        back = meshrt.to_torch(t, mesh_composer=composed(mesh))
        assert back.dtype == torch.bfloat16
        assert torch.equal(back, host.to(torch.bfloat16))
        exact = meshrt.from_torch(host, dtype=meshrt.float32, layout=meshrt.ROW_MAJOR_LAYOUT, device=mesh,
                                  mesh_mapper=sharded(mesh))
        assert torch.equal(meshrt.to_torch(exact, mesh_composer=composed(mesh)), host)
        meshrt.deallocate(t)
        meshrt.deallocate(t)  # idempotent
        assert not t.is_allocated()
        exact.deallocate()
        assert dram_used(mesh) == before


def test_bfloat16_torch_tensors_go_on_bit_for_bit():
    with meshrt.open_mesh_device(meshrt.MeshShape(2, 4)) as mesh:
        host = (torch.randn(4, 8, 32, 64) * 1000).to(torch.bfloat16)
        host[0, 0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
        t = meshrt.from_torch(host, device=mesh, mesh_mapper=sharded(mesh))
        back = meshrt.to_torch(t, mesh_composer=composed(mesh))
        assert back.dtype == torch.bfloat16
        assert torch.equal(back.view(torch.int16), host.view(torch.int16))
        wide = meshrt.from_torch(host[:, :, :, :32].contiguous(), dtype=meshrt.float32, device=mesh,
                                 mesh_mapper=sharded(mesh))
        assert torch.equal(meshrt.to_torch(wide, mesh_composer=composed(mesh)), host[:, :, :, :32].float())


def test_add_and_matmul_match_torch_within_bfloat16_precision():
    with meshrt.open_mesh_device(meshrt.MeshShape(2, 4)) as mesh:
        torch.manual_seed(0)
        a, b = torch.rand(8, 8, 64, 64), torch.rand(8, 8, 64, 64)
        x, y = torch.rand(8, 8, 64, 32), torch.rand(8, 8, 32, 64)
        on = [meshrt.distribute_tensor(t, sharded(mesh), mesh) for t in (a, b, x, y)]
        total = meshrt.to_torch(meshrt.add(on[0], on[1]), mesh_composer=composed(mesh)).float()
        product = meshrt.to_torch(meshrt.matmul(on[2], on[3]), mesh_composer=composed(mesh)).float()
        bf = [t.to(torch.bfloat16).float() for t in (a, b, x, y)]
        assert torch.allclose(total, bf[0] + bf[1], rtol=1 / 128, atol=2e-2)
        assert torch.allclose(product, bf[2] @ bf[3], rtol=1 / 128, atol=2e-1)
        assert mesh.num_program_cache_entries() == 2
        mesh.disable_and_clear_program_cache()
        assert mesh.num_program_cache_entries() == 0


def test_numpy_in_and_out_and_replication():
    with meshrt.open_mesh_device(meshrt.MeshShape(1, 2)) as mesh:
        values = numpy.arange(64 * 32, dtype=numpy.float64).reshape(64, 32) / 64
        t = meshrt.from_numpy(values, dtype=meshrt.float32, device=mesh)  # replicated without a mapper
        out = meshrt.to_numpy(t)
        assert out.dtype == numpy.float32
        assert numpy.array_equal(out, values.astype(numpy.float32))


def test_errors_raise_meshrt_error_with_a_code_and_the_figures():
    with meshrt.open_mesh_device(meshrt.MeshShape(2, 4)) as mesh:
        with pytest.raises(meshrt.Error) as uneven:
            meshrt.from_torch(torch.rand(3, 8, 32, 32), device=mesh, mesh_mapper=sharded(mesh))
        assert uneven.value.code == "invalid_argument"
        assert "(3, 8, 32, 32)" in str(uneven.value)
        with pytest.raises(meshrt.Error) as wrong_mesh:
            meshrt.create_mesh_mapper(mesh, meshrt.MeshMapperConfig([meshrt.PlacementReplicate()] * 2,
                                                                   meshrt.MeshShape(1, 1)))
        assert "1x1" in wrong_mesh.value.message
        a = meshrt.from_torch(torch.rand(8, 8, 32, 64), device=mesh, mesh_mapper=sharded(mesh))
        b = meshrt.from_torch(torch.rand(8, 8, 32, 64), device=mesh, mesh_mapper=sharded(mesh))
        with pytest.raises(meshrt.Error, match="cannot multiply"):
            meshrt.matmul(a, b)
        with pytest.raises(meshrt.Error) as huge:
            meshrt.create_mesh_buffer(mesh, size=1 << 40, page_size=2048)
        assert huge.value.code == "out_of_memory"
        with pytest.raises(meshrt.Error):
            meshrt.from_numpy(numpy.zeros((1, 1, 1, 1, 1)), device=mesh)
        with pytest.raises(meshrt.Error):
            meshrt.from_numpy(numpy.zeros((0, 4)), device=mesh)
        with pytest.raises(meshrt.Error):
            meshrt.get_memory_view(mesh, 99, meshrt.BufferType.L1)
    with pytest.raises(meshrt.Error):
        meshrt.open_mesh_device(meshrt.MeshShape(0, 4))
    with pytest.raises(meshrt.Error, match="no_such_chip"):
        meshrt.open_mesh_device(meshrt.MeshShape(1, 1), spec="no_such_chip")
    with pytest.raises(TypeError):
        meshrt.open_mesh_device(meshrt.MeshShape(-1, 4))


def test_objects_outliving_their_mesh_raise_and_free_once():
    mesh = meshrt.open_mesh_device(meshrt.MeshShape(1, 2))
    t = meshrt.from_torch(torch.rand(64, 64), device=mesh)
    buffer = meshrt.create_mesh_buffer(mesh, size=8 * KIB, page_size=2 * KIB, name="raw")
    meshrt.close_mesh_device(mesh)
    assert not t.is_allocated()
    with pytest.raises(meshrt.Error) as closed:
        meshrt.to_torch(t)
    assert closed.value.code in ("device_closed", "invalid_argument")
    with pytest.raises(meshrt.Error):
        meshrt.add(t, t)
    with pytest.raises(meshrt.Error):
        buffer.read()
    meshrt.deallocate(t)  # nothing left to free: no error, no second Free
    del mesh, t, buffer
    gc.collect()


def test_raw_mesh_buffers_write_and_read():
    with meshrt.open_mesh_device(meshrt.MeshShape(2, 2)) as mesh:
        buffer = meshrt.create_mesh_buffer(mesh, size=16 * KIB, page_size=2 * KIB, buffer_type=meshrt.BufferType.L1,
                                           name="weights")
        assert buffer.size == 16 * KIB and buffer.buffer_type == meshrt.BufferType.L1
        data = bytes(range(256)) * 64
        buffer.write(data)
        assert buffer.read() == data
        with pytest.raises(meshrt.Error):
            buffer.write(b"short")
        view = meshrt.get_memory_view(mesh, 3, meshrt.BufferType.L1)
        assert any(block["allocated"] and block["address"] == buffer.address for block in view.block_table)
        buffer.deallocate()
        assert not buffer.is_allocated()
