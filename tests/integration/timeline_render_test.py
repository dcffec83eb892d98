#!/usr/bin/env python3
"""meshrt-smi --timeline: the Chrome trace has the format's required fields and the moments, and
headless Chromium draws the page's plot.

A real server; meshrt-demo's tensors scenario (holding 50 ms after every step, so that each step
is sampled), then a buffers demo killed while it holds the seed's buffers (a crash reclaim).
`meshrt-smi --timeline t.json` must be a valid trace event file: every event with ph, name, pid
and tid, ts on all but metadata, counters with numeric args, instants with a scope, and the
moments (process start, process exit, crash reclaim). `--timeline t.html` is loaded in Chromium:
the DOM after its script ran must hold a chart per device and type with both processes' areas,
and the screenshot must show the processes' colours. Exit 77 (skipped) only without chromium.

usage: timeline_render_test.py BIN_DIR
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from map_render_test import decode_png  # noqa: E402

SKIP = 77
PALETTE = [(0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B)]  # the first two processes' colours


def fail(message):
    print(f"FAILED: {message}")
    return 1


def check_trace(trace, tensors_pid, crashed_pid):
    events = trace.get("traceEvents")
    if not isinstance(events, list) or not events:
        return "no traceEvents list"
    for event in events:
        for field in ("ph", "name", "pid", "tid"):
            if field not in event:
                return f"an event without {field}: {event}"
        if event["ph"] != "M" and not isinstance(event.get("ts"), (int, float)):
            return f"an event without a numeric ts: {event}"
        if event["ph"] == "C" and not all(isinstance(v, (int, float)) for v in event.get("args", {}).values()):
            return f"a counter with a value that is not a number: {event}"
        if event["ph"] == "i" and event.get("s") not in ("g", "p", "t"):
            return f"an instant without a scope: {event}"
    kinds = {(e["args"]["kind"], e["args"]["pid"]) for e in events if e["ph"] == "i"}
    for wanted in [("process start", tensors_pid), ("process exit", tensors_pid), ("process start", crashed_pid),
                   ("crash reclaim", crashed_pid)]:
        if wanted not in kinds:
            return f"no {wanted[0]} moment of pid {wanted[1]} among {sorted(kinds)}"
    dram = [e for e in events if e["ph"] == "C" and e["name"] == "DRAM used bytes, by process" and e["pid"] == 1000]
    labels = {label for e in dram for label in e["args"]}
    if not any(f"(pid {tensors_pid})" in label for label in labels) or \
            not any(f"(pid {crashed_pid})" in label for label in labels):
        return f"device 0's DRAM counter names {sorted(labels)}, not both demos"
    # The seed's buffers were live on device 0 until the kill: 8 of 12.5 MiB and the system buffers.
    peak = max(e["args"].get(f"meshrt-demo (pid {crashed_pid})", 0) for e in dram)
    if peak < 8 * 13_107_200:
        return f"the killed demo's DRAM on device 0 peaks at {peak} bytes, under its 8 buffers of 12.5 MiB"
    if dram[-1]["args"].get(f"meshrt-demo (pid {crashed_pid})") != 0:
        return "the killed demo's DRAM did not come back to 0 after the crash reclaim"
    return None


def main():
    bin_dir = sys.argv[1]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    work = tempfile.mkdtemp(prefix="meshrt-timeline-")
    server = None
    try:
        sock = os.path.join(work, "alloc.sock")
        server = subprocess.Popen([os.path.join(bin_dir, "meshrt-alloc-server"), "--socket", sock, "--quiet"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        smi = os.path.join(bin_dir, "meshrt-smi")
        deadline = time.monotonic() + 30
        while subprocess.run([smi, "--socket", sock], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                return fail("the server did not start")
            time.sleep(0.05)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHRT_ALLOC_", "TT_ALLOC_"))}
        env.update(MESHRT_ALLOC_TRACKING="1", MESHRT_ALLOC_SERVER=sock)
        demo = os.path.join(bin_dir, "meshrt-demo")
        tensors = subprocess.run([demo, "--scenario", "tensors", "--hold", "0.05", "--scale-down", "2"],
                                 capture_output=True, text=True, env=env, timeout=300)
        if tensors.returncode != 0:
            return fail(f"the tensors scenario failed:\n{tensors.stdout[-2000:]}{tensors.stderr[-2000:]}")
        log = os.path.join(work, "demo.log")
        held = subprocess.Popen([demo, "--hold", "300", "--no-verify"], stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, env=env)
        while "holding" not in open(log).read():
            if time.monotonic() > deadline + 60 or held.poll() is not None:
                return fail("the buffers demo never held its buffers")
            time.sleep(0.05)
        time.sleep(0.1)  # sampled while held
        held.send_signal(signal.SIGKILL)
        held.wait(timeout=30)
        # The reclaim is sampled once the server has seen the disconnect.
        while '"reclaimed_allocations":0' in subprocess.run([smi, "--socket", sock, "--json"], capture_output=True,
                                                            text=True).stdout.replace(" ", ""):
            if time.monotonic() > deadline + 120:
                return fail("the server never reclaimed the killed demo's buffers")
            time.sleep(0.05)
        time.sleep(0.1)

        trace_path = os.path.join(work, "t.json")
        made = subprocess.run([smi, "--socket", sock, "--timeline", trace_path], capture_output=True, text=True)
        if made.returncode != 0 or "samples and" not in made.stdout:
            return fail(f"meshrt-smi --timeline t.json: exit {made.returncode}: {made.stdout}{made.stderr}")
        # The tensors demo's pid: its process start moment is the first.
        trace = json.load(open(trace_path))
        starts = [e["args"]["pid"] for e in trace["traceEvents"] if e["ph"] == "i" and e["args"]["kind"] == "process start"]
        if len(starts) != 2:
            return fail(f"{len(starts)} process start moments, not 2")
        problem = check_trace(trace, starts[0], held.pid)
        if problem:
            return fail(problem)

        page = os.path.join(work, "t.html")
        made = subprocess.run([smi, "--socket", sock, "--timeline", page], capture_output=True, text=True)
        if made.returncode != 0:
            return fail(f"meshrt-smi --timeline t.html: exit {made.returncode}: {made.stderr}")
        wrong = subprocess.run([smi, "--socket", sock, "--timeline", os.path.join(work, "t.txt")],
                               capture_output=True, text=True)
        if wrong.returncode != 2 or ".json" not in wrong.stderr:
            return fail(f"--timeline t.txt: exit {wrong.returncode}, not 2 with a message naming .json and .html")
        if chromium is None:
            print("SKIPPED: Debian's chromium package is not installed (apt-get install chromium)")
            return SKIP
        profile = f"--user-data-dir={os.path.join(work, 'chromium')}"
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", profile, "--dump-dom",
                              "file://" + page], capture_output=True, text=True, timeout=120).stdout
        ready = re.search(r'<body data-ready="(\d+)"', dom)
        if ready is None:
            return fail("the page's script did not run to its end in Chromium")
        charts = re.findall(r'<svg class="chart" data-chart="\d+" data-device="(\d+)" data-type="(\w+)"', dom)
        if int(ready.group(1)) != len(charts) or ("0", "dram") not in charts or ("7", "l1") not in charts:
            return fail(f"the page has charts {charts}, its script saw {ready.group(1)}")
        areas = set(re.findall(r'<path class="area" data-pid="(\d+)"', dom))
        if areas != {str(starts[0]), str(held.pid)}:
            return fail(f"the page's areas are of pids {areas}, not both demos'")
        if 'data-kind="crash reclaim"' not in dom:
            return fail("the page marks no crash reclaim")

        png = os.path.join(work, "t.png")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", profile,
                        f"--screenshot={png}", "--window-size=1040,1400", "file://" + page],
                       capture_output=True, timeout=120)
        if not os.path.exists(png):
            return fail("chromium wrote no screenshot")
        width, height, rows, channels = decode_png(png)
        counts = {colour: 0 for colour in PALETTE}
        for row in rows:
            for x in range(0, width * channels, channels):
                pixel = tuple(row[x:x + 3])
                if pixel in counts:
                    counts[pixel] += 1
        if min(counts.values()) < 500:
            return fail(f"the screenshot shows too little of the processes' colours: {counts}")
        print(f"ok: {len(trace['traceEvents'])} trace events; {len(charts)} charts, areas of pids {sorted(areas)}; "
              f"colour pixels {list(counts.values())}")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
