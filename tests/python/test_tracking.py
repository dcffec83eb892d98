"""Tracking from Python works as in C++: with MESHRT_ALLOC_TRACKING=1 (or ttnn's
TT_ALLOC_TRACKING_ENABLED=1) a Python process streams every allocation and free to the server,
which sees its tensors live while they are and nothing left when it ends."""
import subprocess
import sys
import tempfile

import pytest

from server_helpers import BIN, PrivateServer, category, wait_for

SCRIPT = r"""
import sys, torch, meshrt
mesh = meshrt.open_mesh_device(meshrt.MeshShape(2, 4))
mapper = meshrt.create_mesh_mapper(mesh, meshrt.MeshMapperConfig([meshrt.PlacementShard(0), meshrt.PlacementShard(1)],
                                                                meshrt.MeshShape(2, 4)))
a = meshrt.from_torch(torch.rand(8, 8, 128, 128), device=mesh, mesh_mapper=mapper)
b = meshrt.from_torch(torch.rand(8, 8, 128, 128), device=mesh, mesh_mapper=mapper)
total = meshrt.add(a, b)
print("holding", flush=True)
sys.stdin.readline()
for t in (a, b, total):
    meshrt.deallocate(t)
mesh.disable_and_clear_program_cache()
meshrt.close_mesh_device(mesh)
print("done", flush=True)
"""


@pytest.mark.skipif(not BIN, reason="MESHRT_BIN_DIR (the server's directory) is not set")
@pytest.mark.parametrize("switch", ["MESHRT_ALLOC_TRACKING", "TT_ALLOC_TRACKING_ENABLED"])
def test_a_python_process_is_tracked_by_the_server(switch):
    with tempfile.TemporaryDirectory() as work:
        server = PrivateServer(work)
        try:
            client = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=server.client_environment(switch), text=True)
            assert client.stdout.readline().strip() == "holding"
            shard = 4 * 2 * 128 * 128 * 2  # (4, 2, 128, 128) bfloat16 per device
            live = wait_for("the tensors on the server",
                            lambda: (s := server.summary()) and category(s, 7, "dram", "buffer") == 3 * shard and s)
            assert category(live, 0, "dram", "system") == 14 * 1024 * 1024
            assert category(live, 0, "dram", "program") > 0
            assert [p["pid"] for p in live["processes"]] == [client.pid]
            out, _ = client.communicate("go\n", timeout=120)
            assert client.returncode == 0 and out.strip() == "done"
            server.assert_clean_after_clients()
        finally:
            if "client" in locals() and client.poll() is None:
                client.kill()
            server.stop()
