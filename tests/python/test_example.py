"""examples/test_mesh_allocation.py, the seed's test ported, against a private server: at each of
its steps meshrt-smi's per-device, per-category figures are what the shapes imply (computed here),
and at the end nothing is live and no free was unknown."""
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server_helpers import BIN, PrivateServer, category, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_mesh_allocation.py"


@pytest.mark.skipif(not BIN, reason="MESHRT_BIN_DIR (the server's directory) is not set")
def test_the_seed_test_step_by_step_through_the_server():
    bf16, batch = 2, 4 * 2  # (8, 8, ...) sharded over 2x4 on dims 0 and 1
    side, inner, outer = 512 // 4, 128 // 4, 256 // 4  # --scale-down 4
    ab = batch * side * side * bf16
    x, y, product = batch * outer * inner * bf16, batch * inner * outer * bf16, batch * outer * outer * bf16
    binaries = 6144 + 8192 + 4096  # reader, compute, writer of one operation
    system = 14 * 1024 * 1024
    steps = [  # DRAM of category buffer, of category program, of category system
        (0, 0, system), (ab, 0, system), (2 * ab, 0, system), (3 * ab, binaries, system),
        (3 * ab + x + y + product, 2 * binaries, system), (2 * ab + x + y + product, 2 * binaries, system),
        (ab + x + y + product, 2 * binaries, system), (x + y + product, 2 * binaries, system),
        (y + product, 2 * binaries, system), (product, 2 * binaries, system), (0, 2 * binaries, system),
        (0, 0, system), (0, 0, 0),
    ]
    with tempfile.TemporaryDirectory() as work:
        server = PrivateServer(work)
        try:
            log = open(os.path.join(work, "example.log"), "w+")
            child = subprocess.Popen([sys.executable, str(EXAMPLE), "--hold", "120", "--scale-down", "4"],
                                     stdout=log, stderr=subprocess.STDOUT, env=server.client_environment())
            output = lambda: Path(log.name).read_text()
            for step, (tensors, programs, system_dram) in enumerate(steps, start=1):
                wait_for(f"step {step}", lambda: f"holding after step {step} " in output(), 120)

                def matches():
                    s = server.summary()
                    return s and all(category(s, d, "dram", "buffer") == tensors
                                     and category(s, d, "dram", "program") == programs
                                     and category(s, d, "dram", "system") == system_dram
                                     and category(s, d, "l1", "circular_buffer") == 0 for d in range(8))

                wait_for(f"the server's figures of step {step}", matches, 30)
                child.send_signal(signal.SIGUSR1)
            assert child.wait(timeout=120) == 0, output()
            assert "test_mesh_allocation: passed" in output()
            server.assert_clean_after_clients()
        finally:
            if "child" in locals() and child.poll() is None:
                child.kill()
            server.stop()
