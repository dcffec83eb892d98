"""What the tests of the Python package share: meshrt-smi's view of a private server."""
import json
import os
import subprocess
import time

BIN = os.environ.get("MESHRT_BIN_DIR", "")


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


class PrivateServer:
    """meshrt-alloc-server on a temporary socket for one test, and the environment that points a
    child process at it."""

    def __init__(self, work):
        self.socket = os.path.join(work, "alloc.sock")
        self.process = subprocess.Popen([os.path.join(BIN, "meshrt-alloc-server"), "--socket", self.socket, "--quiet"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for("the server", lambda: smi_json(self.socket))
        except BaseException:
            self.process.kill()
            raise

    def client_environment(self, switch="MESHRT_ALLOC_TRACKING"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHRT_ALLOC_", "TT_ALLOC_"))}
        env.update({switch: "1", "MESHRT_ALLOC_SERVER": self.socket})
        return env

    def summary(self):
        return smi_json(self.socket)

    def assert_clean_after_clients(self):
        """Once every client's session ended: nothing live, no unknown free, every allocation freed."""
        after = wait_for("the clients' sessions to end", lambda: (s := self.summary()) and not s["processes"] and s)
        assert after["active_allocations"] == 0
        assert after["unknown_deallocations"] == 0
        assert after["total_allocations"] == after["total_deallocations"] > 0

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
