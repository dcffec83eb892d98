"""No input from Python crashes the interpreter: each hostile call below raises a Python exception
(meshrt.Error, or TypeError/ValueError from the argument conversion), run in a child interpreter
so that an abort would show as its exit status rather than take pytest down."""
import subprocess
import sys
import textwrap

HOSTILE = textwrap.dedent("""
    import numpy, torch, meshrt
    S = meshrt.MeshShape
    mesh = meshrt.open_mesh_device(S(2, 4))
    shard = meshrt.create_mesh_mapper(mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0),
                                                                      meshrt.PlacementShard(1)], S(2, 4)))
    t = meshrt.from_torch(torch.rand(8, 8, 32, 32), device=mesh, mesh_mapper=shard)
    calls = [
        lambda: meshrt.open_mesh_device(S(9, 9)),
        lambda: meshrt.open_mesh_device(S(0, 0)),
        lambda: meshrt.open_mesh_device(S(2**31, 2**31)),
        lambda: meshrt.open_mesh_device(S(1, 1), spec=""),
        lambda: meshrt.create_mesh_buffer(mesh, 4096, 0),
        lambda: meshrt.create_mesh_buffer(mesh, 2**64 - 1, 2**63),
        lambda: meshrt.create_mesh_buffer(mesh, 4096, 3),
        lambda: meshrt.create_mesh_buffer(mesh, -1, 2048),
        lambda: meshrt.get_memory_view(mesh, 8, meshrt.BufferType.DRAM),
        lambda: meshrt.get_memory_view(mesh, 2**32 - 1, meshrt.BufferType.TRACE),
        lambda: meshrt.from_torch(torch.rand(8, 8), device=mesh, mesh_mapper=meshrt.create_mesh_mapper(
            mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0)] * 3, S(2, 4)))),
        lambda: meshrt.from_torch(torch.rand(8, 8), device=mesh, mesh_mapper=meshrt.create_mesh_mapper(
            mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(7), meshrt.PlacementReplicate()], S(2, 4)))),
        lambda: meshrt.from_torch(torch.rand(8, 8), device=mesh, mesh_mapper=meshrt.create_mesh_mapper(
            mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0), meshrt.PlacementShard(0)], S(2, 4)))),
        lambda: meshrt.from_torch(torch.rand(8, 8, 32, 32), device=None),
        lambda: meshrt.from_numpy(numpy.array(["a", "b"]), device=mesh),
        lambda: meshrt.from_numpy(numpy.zeros(()), device=mesh),
        lambda: meshrt.from_numpy(numpy.zeros((1, 0, 3)), device=mesh),
        lambda: meshrt.from_numpy(numpy.zeros((2,) * 6), device=mesh),
        lambda: meshrt.to_numpy(t),  # sharded: needs a composer
        lambda: meshrt.to_numpy(t, mesh_composer=meshrt.create_mesh_composer(mesh, meshrt.MeshComposerConfig([9, 9], S(2, 4)))),
        lambda: meshrt.to_numpy(t, mesh_composer=meshrt.create_mesh_composer(mesh, meshrt.MeshComposerConfig([0], S(2, 4)))),
        lambda: meshrt.to_numpy(t, mesh_composer=meshrt.create_mesh_composer(mesh, meshrt.MeshComposerConfig([0, 1], S(1, 8)))),
        lambda: meshrt.add(t, meshrt.from_torch(torch.rand(8, 8, 32, 64), device=mesh, mesh_mapper=shard)),
        lambda: meshrt.matmul(t, meshrt.from_torch(torch.rand(8, 8, 64, 32), device=mesh, mesh_mapper=shard)),
        lambda: meshrt.add(t, None),
        lambda: meshrt.create_mesh_buffer(None, 4096, 2048),
        lambda: meshrt.get_memory_view(None, 0, meshrt.BufferType.DRAM),
        lambda: meshrt.close_mesh_device(None),
        lambda: meshrt.create_mesh_mapper(None, meshrt.MeshMapperConfig([meshrt.PlacementReplicate()] * 2, S(2, 4))),
        lambda: meshrt.MeshShape(1, 1).num_devices(7),
        lambda: meshrt.get_memory_view(mesh, 0, meshrt.BufferType(9)),
        lambda: meshrt.create_mesh_buffer(mesh, 4096, 2048, meshrt.BufferType(200)),
        lambda: meshrt.from_numpy(numpy.zeros((8, 8)), layout=meshrt.Layout(7), device=mesh),
        lambda: meshrt.from_numpy(numpy.zeros((8, 8)), dtype=meshrt.DataType(7), device=mesh),
        lambda: meshrt.from_torch(torch.zeros(8, 8, dtype=torch.bfloat16), layout=meshrt.Layout(3), device=mesh),
        lambda: meshrt.flush_tracking(float("nan")),
        lambda: meshrt.Tensor.__new__(meshrt.Tensor).deallocate(),
        lambda: meshrt.MeshDevice.__new__(meshrt.MeshDevice).close(),
        lambda: meshrt.MeshBuffer.__new__(meshrt.MeshBuffer).read(),
        lambda: meshrt.MemoryView.__new__(meshrt.MemoryView).block_table,
        lambda: meshrt.Tensor(),
    ]
    raised = 0
    for number, call in enumerate(calls):
        try:
            call()
        except (meshrt.Error, TypeError, ValueError) as error:
            raised += 1
        else:
            print(f"call {number} did not raise")
    meshrt.deallocate(t)
    mesh.close()
    # After the close: everything raises or does nothing, nothing aborts.
    after = [lambda: meshrt.from_torch(torch.rand(8, 8), device=mesh), lambda: mesh.clear_program_cache(),
             lambda: meshrt.get_memory_view(mesh, 0, meshrt.BufferType.L1), lambda: mesh.close()]
    for call in after:
        try:
            call()
        except meshrt.Error:
            pass
    print(f"raised {raised} of {len(calls)}")
""")


def test_hostile_calls_raise_and_never_abort():
    result = subprocess.run([sys.executable, "-c", HOSTILE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the interpreter died ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert "did not raise" not in result.stdout, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    raised, total = last.split()[1], last.split()[3]
    assert raised == total, result.stdout
