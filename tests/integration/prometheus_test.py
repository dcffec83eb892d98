#!/usr/bin/env python3
"""A real Prometheus scrapes a real meshrt-alloc-server while meshrt-demo holds the seed's buffers.

Asks Prometheus's HTTP API (not our endpoint) for the values, so names, labels and the text
format are checked by the engine users run: DRAM 104857600 on device 0 while the buffers are
live, then 0 after the demo frees them. Exit 77 (skipped) only when Debian's prometheus package
is not installed.

usage: prometheus_test.py BIN_DIR
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

SKIP = 77


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, condition, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def query(prometheus_port, promql):
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return None  # Prometheus not up yet
    if body.get("status") != "success":
        raise AssertionError(f"Prometheus refused {promql!r}: {body}")
    return body["data"]["result"]


def value_of(prometheus_port, promql):
    result = query(prometheus_port, promql)
    if not result:
        return None
    if len(result) != 1:
        raise AssertionError(f"{promql!r} matched {len(result)} series: {result}")
    return result[0]["value"][1]


def main():
    bin_dir = sys.argv[1]
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("SKIPPED: Debian's prometheus package is not installed (apt-get install prometheus)")
        return SKIP
    work = tempfile.mkdtemp(prefix="meshrt-prometheus-")
    processes = []

    def start(argv, log, env=None):
        process = subprocess.Popen(argv, stdout=open(os.path.join(work, log), "w"), stderr=subprocess.STDOUT,
                                   env=env, stdin=subprocess.DEVNULL)
        processes.append(process)
        return process

    def log(name):
        with open(os.path.join(work, name)) as f:
            return f.read()

    try:
        sock = os.path.join(work, "alloc.sock")
        start([os.path.join(bin_dir, "meshrt-alloc-server"), "--socket", sock, "--metrics", "127.0.0.1:0", "--quiet"],
              "server.log")
        metrics_port = wait_for("the server's metrics address",
                                lambda: (m := re.search(r"http://127\.0\.0\.1:(\d+)/metrics", log("server.log")))
                                and int(m.group(1)))

        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHRT_ALLOC_", "TT_ALLOC_"))}
        env.update(MESHRT_ALLOC_TRACKING="1", MESHRT_ALLOC_SERVER=sock)
        demo = start([os.path.join(bin_dir, "meshrt-demo"), "--hold", "300", "--no-verify"], "demo.log", env)
        wait_for("the demo to hold its buffers", lambda: "holding" in log("demo.log"))

        prometheus_port = free_port()
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: meshrt\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{metrics_port}']\n")
        start([prometheus, f"--config.file={config}", f"--storage.tsdb.path={os.path.join(work, 'data')}",
               f"--web.listen-address=127.0.0.1:{prometheus_port}"], "prometheus.log")

        dram = 'meshrt_device_memory_used_bytes{job="meshrt",device="0",type="dram",category="buffer"}'
        l1 = 'meshrt_device_memory_used_bytes{job="meshrt",device="0",type="l1",category="buffer"}'
        wait_for("Prometheus to scrape DRAM 104857600 on device 0",
                 lambda: value_of(prometheus_port, dram) == "104857600")
        assert value_of(prometheus_port, l1) == "12582912", value_of(prometheus_port, l1)
        # Each device's system buffers (ADR 0020) sit beside the seed's: 3 of them, 8 + 6 MiB of
        # DRAM and a 4 KiB page of L1 on each of 64 cores.
        system_dram, system_l1 = 14 * 1024 * 1024, 64 * 4096
        system = 'meshrt_device_memory_used_bytes{job="meshrt",device="0",type="dram",category="system"}'
        assert value_of(prometheus_port, system) == str(system_dram), value_of(prometheus_port, system)
        assert value_of(prometheus_port, "meshrt_active_allocations") == str(128 + 3 * 8)
        live = value_of(prometheus_port, f'meshrt_process_live_bytes{{pid="{demo.pid}"}}')
        assert live == str(8 * (104857600 + 12582912 + system_dram + system_l1)), live
        assert value_of(prometheus_port, 'up{job="meshrt"}') == "1"
        print(f"Prometheus saw DRAM 104857600 and L1 12582912 on device 0, 128 live buffers of pid {demo.pid}")

        demo.send_signal(signal.SIGUSR1)  # the demo frees its buffers and exits
        if demo.wait(timeout=120) != 0:
            raise AssertionError("meshrt-demo failed:\n" + log("demo.log"))
        wait_for("Prometheus to scrape DRAM 0 on device 0", lambda: value_of(prometheus_port, dram) == "0"
                 and value_of(prometheus_port, system) == "0")
        assert value_of(prometheus_port, "meshrt_active_allocations") == "0"
        assert value_of(prometheus_port, "meshrt_unknown_deallocations_total") == "0"
        print("after the demo freed them, Prometheus saw DRAM 0 and no active allocations")
        return 0
    except AssertionError as failure:
        print(f"FAILED: {failure}")
        for name in ("server.log", "demo.log", "prometheus.log"):
            path = os.path.join(work, name)
            if os.path.exists(path):
                print(f"--- {name} (last 30 lines) ---")
                print("\n".join(log(name).splitlines()[-30:]))
        return 1
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
