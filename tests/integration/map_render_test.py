#!/usr/bin/env python3
"""meshrt-smi --map rendered by headless Chromium: the screenshot must show the map, not a blank page.

A real server, meshrt-demo holding the seed's buffers, `meshrt-smi --map`, then Debian's
chromium takes a screenshot of the SVG. The PNG is decoded here (zlib, no other library) and
must hold the demo's process colour over a real area, the free-memory colour, and text. Exit 77
(skipped) only when chromium is not installed.

usage: map_render_test.py BIN_DIR
"""
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

SKIP = 77
DEMO_COLOUR = (0x4E, 0x79, 0xA7)  # the first colour of the map's palette: the only process here
FREE_COLOUR = (0xEE, 0xF1, 0xF4)
# The seed's 128 device buffers and its 2x4 mesh's system buffers, 3 per device (ADR 0020).
LIVE = 128 + 3 * 8


def decode_png(path):
    """Pixels of an 8-bit, non-interlaced RGB or RGBA PNG, as (width, height, rows of bytes, channels)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    at, idat, header = 8, b"", None
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunk = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        at += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous, at = [], bytearray(stride), 0
    for _ in range(height):
        kind, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        at += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            up_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows, channels


def main():
    bin_dir = sys.argv[1]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("SKIPPED: Debian's chromium package is not installed (apt-get install chromium)")
        return SKIP
    work = tempfile.mkdtemp(prefix="meshrt-map-")
    server = demo = None
    try:
        sock = os.path.join(work, "alloc.sock")
        server = subprocess.Popen([os.path.join(bin_dir, "meshrt-alloc-server"), "--socket", sock, "--quiet"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHRT_ALLOC_", "TT_ALLOC_"))}
        env.update(MESHRT_ALLOC_TRACKING="1", MESHRT_ALLOC_SERVER=sock)
        demo_log = os.path.join(work, "demo.log")
        demo = subprocess.Popen([os.path.join(bin_dir, "meshrt-demo"), "--hold", "300", "--no-verify"],
                                stdout=open(demo_log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        svg = os.path.join(work, "map.svg")
        while True:
            if "holding" in open(demo_log).read():
                result = subprocess.run([os.path.join(bin_dir, "meshrt-smi"), "--socket", sock, "--map", svg],
                                        capture_output=True, text=True)
                if result.returncode == 0 and f"of {LIVE} live buffers" in result.stdout:
                    break
            if time.monotonic() > deadline:
                print(f"FAILED: meshrt-smi --map never saw the demo's {LIVE} buffers")
                return 1
            time.sleep(0.2)
        text = open(svg).read()
        blocks = re.findall(r'<rect class="block" data-pid="(\d+)"', text)
        if len(blocks) != LIVE or set(blocks) != {str(demo.pid)}:
            print(f"FAILED: the map has {len(blocks)} blocks of pids {set(blocks)}, not {LIVE} of {demo.pid}")
            return 1
        categories = re.findall(r'<rect class="block" data-pid="\d+" data-category="(\w+)"', text)
        if categories.count("buffer") != 128 or categories.count("system") != 3 * 8:
            print(f"FAILED: the map's blocks are {sorted(set(categories))}, not 128 of the seed's and 24 system")
            return 1

        png = os.path.join(work, "map.png")
        shot = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={os.path.join(work, 'chromium')}", f"--screenshot={png}",
                               "--window-size=1080,1200", "file://" + svg], capture_output=True, text=True, timeout=120)
        if not os.path.exists(png):
            print(f"FAILED: chromium wrote no screenshot (exit {shot.returncode}):\n{shot.stderr[-2000:]}")
            return 1
        width, height, rows, channels = decode_png(png)
        counts = {}
        for row in rows:
            for x in range(0, width * channels, channels):
                pixel = tuple(row[x:x + 3])
                counts[pixel] = counts.get(pixel, 0) + 1
        total = width * height
        demo_pixels = sum(n for p, n in counts.items() if all(abs(a - b) <= 6 for a, b in zip(p, DEMO_COLOUR)))
        free_pixels = sum(n for p, n in counts.items() if all(abs(a - b) <= 3 for a, b in zip(p, FREE_COLOUR)))
        dark_pixels = sum(n for p, n in counts.items() if sum(p) < 150)  # text
        print(f"screenshot {width}x{height}: {len(counts)} colours, demo blocks {demo_pixels} px, "
              f"free memory {free_pixels} px, text {dark_pixels} px")
        failures = []
        if demo_pixels < total // 200:
            failures.append("the demo's blocks are not visible")
        if free_pixels < total // 10:
            failures.append("free memory is not visible")
        if dark_pixels < 500:
            failures.append("no text")
        if failures:
            print("FAILED: " + "; ".join(failures))
            return 1
        return 0
    finally:
        if demo and demo.poll() is None:
            demo.send_signal(signal.SIGUSR1)
            demo.wait(timeout=60)
        if server and server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
