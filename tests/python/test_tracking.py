"""Tracking from Python works as in C++: with MESHRT_ALLOC_TRACKING=1 (or ttnn's
TT_ALLOC_TRACKING_ENABLED=1) a Python process streams every allocation and free to the server,
which sees its tensors live while they are and nothing left when it ends."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

BIN = os.environ.get("MESHRT_BIN_DIR", "")

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


def smi_json(sock):
    result = subprocess.run([os.path.join(BIN, "meshrt-smi"), "--socket", sock, "--json"], capture_output=True,
                            text=True, timeout=60)
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_for(what, condition, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def category(summary, device, kind, name):
    for d in summary["devices"]:
        if d["id"] == device:
            return d[kind].get("categories", {}).get(name, {}).get("used_bytes", 0)
    return 0


@pytest.mark.skipif(not BIN, reason="MESHRT_BIN_DIR (the server's directory) is not set")
@pytest.mark.parametrize("switch", ["MESHRT_ALLOC_TRACKING", "TT_ALLOC_TRACKING_ENABLED"])
def test_a_python_process_is_tracked_by_the_server(switch):
    with tempfile.TemporaryDirectory() as work:
        sock = os.path.join(work, "alloc.sock")
        server = subprocess.Popen([os.path.join(BIN, "meshrt-alloc-server"), "--socket", sock, "--quiet"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for("the server", lambda: smi_json(sock))
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHRT_ALLOC_", "TT_ALLOC_"))}
            env.update({switch: "1", "MESHRT_ALLOC_SERVER": sock})
            client = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env, text=True)
            assert client.stdout.readline().strip() == "holding"
            shard = 4 * 2 * 128 * 128 * 2  # (4, 2, 128, 128) bfloat16 per device
            live = wait_for("the tensors on the server",
                            lambda: (s := smi_json(sock)) and category(s, 7, "dram", "buffer") == 3 * shard and s)
            assert category(live, 0, "dram", "system") == 14 * 1024 * 1024
            assert category(live, 0, "dram", "program") > 0
            assert [p["pid"] for p in live["processes"]] == [client.pid]
            out, _ = client.communicate("go\n", timeout=120)
            assert client.returncode == 0 and out.strip() == "done"
            after = wait_for("the process to end its session", lambda: (s := smi_json(sock)) and not s["processes"] and s)
            assert after["active_allocations"] == 0
            assert after["unknown_deallocations"] == 0
            assert after["total_allocations"] == after["total_deallocations"] > 0
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
