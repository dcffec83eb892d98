"""meshrt's pytest plugin: device-memory leaks and limits as test failures.

Enable it with ``-p meshrt.pytest_plugin`` or ``pytest_plugins = ["meshrt.pytest_plugin"]`` in a
conftest. It starts a private allocation server for the session and points this process (and
every process it starts) at it, so the server sees every allocation the tests make.

- ``meshrt_server``: the session's server (``.socket``, ``.summary()``, ``.buffers()``).
- ``mesh_device``: a mesh for the test, closed after it; parametrize it as ttnn's is:
  ``@pytest.mark.parametrize("mesh_device", [(2, 4)], indirect=True)`` (default 1x1).
- ``@pytest.mark.meshrt_no_leaks`` (or ``--meshrt-no-leaks`` for every test): the test fails if
  buffers it created are still live at its end; the report lists them. System and program
  memory belong to a mesh and its cache: they count when the test opened a mesh and did not close
  it (``--meshrt-leaks-all-categories`` counts every category).
- ``--meshrt-stacks`` (or ``MESHRT_ALLOC_STACKS=1``): every allocation carries its call stack, Python
  frames included, and a leak report groups what a test left by the line that allocated it.
- ``@pytest.mark.meshrt_limit(dram="64 MiB", l1="1 MiB")``: fails a test whose peak use on any
  device of this process's meshes, above what was live when it began (a fixture's mesh and its
  system buffers do not count; circular buffers and program binaries do), passed the limit,
  saying by how much. Bytes are counted as meshrt-smi counts them: what each buffer asked for
  (ADR 0006), not the bank pages it reserves. Device ids are per mesh: two meshes open at once
  add up under the same ids.

Processes a test starts are seen through the server when they are started fresh (subprocess,
multiprocessing's spawn or forkserver); a child made by fork() inherits a tracker that no longer
streams (ADR 0017). The check runs at the end of the test's call, before its fixtures' teardown.
"""
import gc
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import meshrt

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text):
    """Bytes in "64 MiB", "1.5 GB", "4096": an int, or ValueError naming what was wrong."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"meshrt_limit: {text!r} is not a size such as '64 MiB', '1 GB' or '4096'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _program(name):
    """meshrt's program `name`: from MESHRT_BIN_DIR, beside this package (build tree or prefix), or PATH."""
    here = Path(meshrt.__file__).resolve().parent
    places = [os.environ.get("MESHRT_BIN_DIR", "")] + [str(p / "bin") for p in here.parents]
    for place in places:
        if place and os.access(os.path.join(place, name), os.X_OK):
            return os.path.join(place, name)
    found = shutil.which(name)
    if found is None:
        raise pytest.UsageError(f"meshrt's pytest plugin needs {name}: set MESHRT_BIN_DIR to the directory holding it")
    return found


class AllocationServer:
    """A private meshrt-alloc-server on a temporary socket, and queries of it through meshrt-smi."""

    def __init__(self):
        self._work = tempfile.TemporaryDirectory(prefix="meshrt-pytest-")
        self.socket = os.path.join(self._work.name, "alloc.sock")
        self.log_path = os.path.join(self._work.name, "server.log")
        self._smi = _program("meshrt-smi")
        self._log = open(self.log_path, "w")
        self._process = subprocess.Popen([_program("meshrt-alloc-server"), "--socket", self.socket],
                                         stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self._query("--json") is None:
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"meshrt-alloc-server did not start:\n{self.log()}")
            time.sleep(0.02)

    def _query(self, *flags):
        result = subprocess.run([self._smi, "--socket", self.socket, *flags], capture_output=True, text=True,
                                timeout=120)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def _answer(self, *flags):
        answer = self._query(*flags)
        if answer is None:
            raise RuntimeError(f"meshrt: the session's allocation server does not answer; its log:\n{self.log()}")
        return answer

    def summary(self):
        """meshrt-smi --json: per device, per type and category, per process."""
        return self._answer("--json")

    def buffers(self):
        """Every live device buffer: dicts of pid, buffer, mesh_buffer, name, device, type, category, size..."""
        return self._answer("--buffers", "--json")["buffers"]

    def settle(self, own_pid):
        """Waits until this process's events reached the server and no other tracked process is mid-exit."""
        if not meshrt.flush_tracking(30.0):
            pytest.fail("meshrt: the allocation server did not take this process's events within 30 s", pytrace=False)
        deadline = time.monotonic() + 10
        previous = None
        while time.monotonic() < deadline:
            current = self.summary()
            others = [(p["pid"], p.get("live_allocations"), p.get("allocations")) for p in current["processes"]
                      if p["pid"] != own_pid]
            if others == previous:
                return
            previous = others
            time.sleep(0.05)

    def log(self):
        self._log.flush()
        return Path(self.log_path).read_text()

    def stop(self):
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._log.close()
        self._work.cleanup()


def pytest_addoption(parser):
    group = parser.getgroup("meshrt", "device memory (meshrt)")
    group.addoption("--meshrt-no-leaks", action="store_true",
                    help="fail every test that leaves device buffers it created live (as @pytest.mark.meshrt_no_leaks)")
    group.addoption("--meshrt-leaks-all-categories", action="store_true",
                    help="count live system, program and circular buffers as leaks too, not only buffers")
    group.addoption("--meshrt-stacks", action="store_true",
                    help="record each allocation's call stack (MESHRT_ALLOC_STACKS=1): leak reports name the lines "
                         "that allocated what was left")


_server = None


def pytest_configure(config):
    global _server
    config.addinivalue_line("markers", "meshrt_no_leaks: fail the test if device buffers it created are still live")
    config.addinivalue_line("markers", "meshrt_limit(dram=None, l1=None): fail the test if any device's peak use "
                                       "of DRAM or L1 passes the limit, e.g. dram='64 MiB'")
    if getattr(config, "workerinput", None) is None and _server is None:
        _server = AllocationServer()
        # Before any test opens a mesh: this process's tracker is made on first use.
        os.environ["MESHRT_ALLOC_TRACKING"] = "1"
        os.environ["MESHRT_ALLOC_SERVER"] = _server.socket
        if config.getoption("meshrt_stacks"):
            os.environ["MESHRT_ALLOC_STACKS"] = "1"


def pytest_unconfigure(config):
    global _server
    if _server is not None:
        meshrt._meshrt._shutdown_tracking()  # Goodbye first: the server going away is no news then
        _server.stop()
        _server = None


@pytest.fixture(scope="session")
def meshrt_server():
    """The session's private allocation server; this process and its children report to it."""
    if _server is None:
        pytest.skip("meshrt's allocation server was not started (pytest_configure did not run here)")
    return _server


@pytest.fixture
def mesh_device(request):
    """A mesh for one test, closed after it. Parametrize with indirect=True: (rows, cols), default (1, 1)."""
    rows, cols = getattr(request, "param", (1, 1))
    mesh = meshrt.open_mesh_device(meshrt.MeshShape(rows, cols))
    yield mesh
    meshrt.close_mesh_device(mesh)


def _describe(buffer):
    return (f"  buffer {buffer['buffer']} (mesh buffer {buffer.get('mesh_buffer', 0)} "
            f"'{buffer.get('name', '')}') on device {buffer['device']}: {buffer['type']}, "
            f"{buffer.get('category', 'buffer')}, {buffer['size']} bytes, pid {buffer['pid']}"
            f"{', at ' + buffer['call_site'] if buffer.get('call_site') else ''}")


def _by_call_site(leaked):
    """Lines of what was left, one per call site, most bytes first (only with stacks on)."""
    sites = {}
    for buffer in leaked:
        if buffer.get("call_site"):
            site = sites.setdefault(buffer["call_site"], {"bytes": 0, "buffers": 0, "devices": set()})
            site["bytes"] += buffer["size"]
            site["buffers"] += 1
            site["devices"].add(buffer["device"])
    ranked = sorted(sites.items(), key=lambda item: (-item[1]["bytes"], item[0]))
    return [f"  {s['bytes']} bytes in {s['buffers']} buffers on {len(s['devices'])} devices at {where}"
            for where, s in ranked]


def _key(buffer):
    return buffer["pid"], buffer["buffer"]


def _ended_with_buffers(summary):
    return sum(summary.get(k, 0) for k in ("leaked_at_exit", "lost_at_exit", "reclaimed_allocations"))


def _leaks(before, after, all_categories):
    """Buffers live now that were not before: those of category buffer, and every category of a
    process that opened a mesh (new system buffers) and did not close it; or all, if asked."""
    known = {_key(b) for b in before}
    new = [b for b in after if _key(b) not in known]
    if all_categories:
        return new
    unclosed = {b["pid"] for b in new if b.get("category") == "system"}
    return [b for b in new if b.get("category", "buffer") == "buffer" or b["pid"] in unclosed]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    check_leaks = item.get_closest_marker("meshrt_no_leaks") is not None or item.config.getoption("meshrt_no_leaks")
    limit = item.get_closest_marker("meshrt_limit")
    if _server is None or not (check_leaks or limit):
        yield
        return
    if check_leaks and not meshrt.tracking_enabled():
        pytest.fail("meshrt: this process does not stream its allocations to the server, so leaks cannot be checked: "
                    "something made its tracker (opened a mesh) before meshrt.pytest_plugin set "
                    "MESHRT_ALLOC_TRACKING; load the plugin with -p meshrt.pytest_plugin or in the root conftest",
                    pytrace=False)
    if limit is not None and limit.args:
        pytest.fail(f"meshrt_limit takes dram= and l1= by name, not {limit.args!r}", pytrace=False)
    try:
        limits = {t: parse_size(v) for t, v in (limit.kwargs.items() if limit else []) if v is not None}
    except ValueError as wrong:
        pytest.fail(str(wrong), pytrace=False)
    unknown = set(limits) - {"dram", "l1"}
    if unknown:
        pytest.fail(f"meshrt_limit takes dram= and l1=, not {', '.join(sorted(unknown))}", pytrace=False)
    own = os.getpid()
    _server.settle(own)
    before = _server.buffers() if check_leaks else []
    ended_with_buffers = _ended_with_buffers(_server.summary()) if check_leaks else 0
    if limits:
        meshrt._meshrt._reset_device_peaks()  # this process's meshes, from what is live now
    outcome = yield
    if outcome.excinfo is not None:
        return
    gc.collect()  # what only a reference cycle kept is garbage, not a leak
    _server.settle(own)
    failures = []
    if check_leaks:
        leaked = _leaks(before, _server.buffers(), item.config.getoption("meshrt_leaks_all_categories"))
        # Processes that ended during the test with buffers live are off the list: the server counted them.
        ended = _ended_with_buffers(_server.summary()) - ended_with_buffers
        if ended:
            failures.append(f"meshrt: processes that ended during this test still held {ended} device buffers "
                            "(leaked at exit, or reclaimed after a crash): see the server's log")
        if leaked:
            total = sum(b["size"] for b in leaked)
            sites = _by_call_site(leaked)
            failures.append(f"meshrt: {len(leaked)} device buffers ({total} bytes) created by this test are still "
                            f"live at its end:\n"
                            + ("  by call site, largest first:\n  " + "\n  ".join(sites[:20]) + "\n" if sites else "")
                            + "\n".join(_describe(b) for b in leaked[:50])
                            + (f"\n  ... and {len(leaked) - 50} more" if len(leaked) > 50 else ""))
    if limits:
        for device, figures in sorted(meshrt._meshrt._device_peaks().items()):
            for kind, bound in limits.items():
                peak = figures.get(kind, 0)
                if peak > bound:
                    failures.append(f"meshrt: device {device} {kind.upper()} peaked at {peak} bytes during the test, "
                                    f"over the limit of {bound} bytes by {peak - bound}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and _server is not None:
        summary = _server.summary()
        if summary is not None:
            report.sections.append(("meshrt allocation server", json.dumps(
                {k: summary.get(k) for k in ("active_allocations", "unknown_deallocations", "double_deallocations",
                                             "total_allocations", "total_deallocations")}, indent=1)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """On a failing session, the server's final figures: what a leak hunt starts from."""
    if _server is None or exitstatus == 0:
        return
    meshrt.flush_tracking(10.0)
    summary = _server.summary()
    if summary is None:
        return
    terminalreporter.section("meshrt allocation server")
    terminalreporter.write_line(
        f"meshrt: at the end of the session the server holds {summary.get('active_allocations')} live device "
        f"buffers of {len(summary.get('processes', []))} processes; {summary.get('total_allocations')} allocations, "
        f"{summary.get('total_deallocations')} frees, {summary.get('unknown_deallocations')} unknown frees")
    for process in summary.get("processes", []):
        terminalreporter.write_line(f"  pid {process['pid']} ({process.get('name', '')}): "
                                    f"{process.get('live_allocations')} live, {process.get('live_bytes')} bytes")

