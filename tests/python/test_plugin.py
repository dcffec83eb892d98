"""meshrt's pytest plugin, run on test files of its own with pytest's pytester: a leaking test
fails with a report of what it left, a clean one passes, a mesh left open is a leak, and limits
trip at the figure they name."""

pytest_plugins = ["pytester"]

MIB = 1024 * 1024


def run(pytester, source, *args):
    pytester.makepyfile(source)
    return pytester.runpytest_subprocess("-p", "meshrt.pytest_plugin", "-p", "no:cacheprovider", *args)


def test_a_leaking_test_fails_with_the_buffers_it_left_and_a_clean_one_passes(pytester):
    result = run(pytester, """
        import pytest, meshrt
        kept = []

        @pytest.mark.meshrt_no_leaks
        @pytest.mark.parametrize("mesh_device", [(2, 4)], indirect=True)
        def test_leaks(mesh_device):
            kept.append(meshrt.create_mesh_buffer(mesh_device, size=8192, page_size=2048, name="forgotten"))

        @pytest.mark.meshrt_no_leaks
        def test_clean(mesh_device):
            buffer = meshrt.create_mesh_buffer(mesh_device, size=8192, page_size=2048, name="freed")
            buffer.deallocate()
            local = meshrt.create_mesh_buffer(mesh_device, size=4096, page_size=2048)  # dropped on return

        def test_unchecked(mesh_device):
            kept.append(meshrt.create_mesh_buffer(mesh_device, size=8192, page_size=2048))
    """)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*test_leaks*",
        "*meshrt: 8 device buffers (65536 bytes) created by this test are still live at its end:*",
        "*'forgotten') on device 0: dram, buffer, 8192 bytes, pid *",
    ])
    result.stdout.fnmatch_lines(["*meshrt: at the end of the session the server holds * live device buffers of 1 "
                                 "processes*", "  pid * (*): * live, * bytes"])
    assert "test_clean FAILED" not in result.stdout.str()


def test_with_stacks_a_leak_report_names_the_python_lines_that_allocated_what_was_left(pytester):
    source = """
        import pytest, meshrt
        kept = []

        def make(mesh, size):
            return meshrt.create_mesh_buffer(mesh, size=size, page_size=2048, name="made")

        @pytest.mark.meshrt_no_leaks
        @pytest.mark.parametrize("mesh_device", [(1, 2)], indirect=True)
        def test_leaks(mesh_device):
            kept.append(make(mesh_device, 4096))
            kept.append(meshrt.create_mesh_buffer(mesh_device, size=16384, page_size=2048, name="direct"))
    """
    result = run(pytester, source, "--meshrt-stacks")
    result.assert_outcomes(failed=1)
    written = next(pytester.path.glob("test_with_stacks*.py")).read_text().splitlines()
    in_make = next(n for n, line in enumerate(written, 1) if "return meshrt.create_mesh_buffer" in line)
    direct = next(n for n, line in enumerate(written, 1) if 'name="direct"' in line)
    # The larger site first; each at the Python line that allocated.
    result.stdout.fnmatch_lines([
        "*meshrt: 4 device buffers (40960 bytes) created by this test are still live at its end:*",
        "*by call site, largest first:*",
        f"*32768 bytes in 2 buffers on 2 devices at test_leaks (*test_with_stacks*.py:{direct})*",
        f"*8192 bytes in 2 buffers on 2 devices at make (*test_with_stacks*.py:{in_make})*",
        f"*'made') on device 0: dram, buffer, 4096 bytes, pid *, at make (*.py:{in_make})*",
    ])
    plain = run(pytester, source)
    plain.assert_outcomes(failed=1)
    assert "by call site" not in plain.stdout.str()


def test_the_option_checks_every_test_and_a_mesh_left_open_leaks_its_system_buffers(pytester):
    result = run(pytester, """
        import meshrt
        kept = []

        def test_opens_and_forgets():
            kept.append(meshrt.open_mesh_device(meshrt.MeshShape(1, 2)))

        def test_opens_and_closes():
            with meshrt.open_mesh_device(meshrt.MeshShape(1, 2)) as mesh:
                kept.append(meshrt.create_mesh_buffer(mesh, size=4096, page_size=2048))
    """, "--meshrt-no-leaks")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_opens_and_forgets*", "*meshrt: 6 device buffers*still live*",
                                 "*on device 1: dram, system, 8388608 bytes*"])


def test_limits_trip_at_the_figure_they_name(pytester):
    result = run(pytester, f"""
        import pytest, meshrt

        @pytest.mark.meshrt_limit(dram="2 MiB")
        def test_within(mesh_device):
            meshrt.create_mesh_buffer(mesh_device, size={2 * MIB}, page_size=2048).deallocate()

        @pytest.mark.meshrt_limit(dram="2 MiB", l1="1 MiB")
        def test_over(mesh_device):
            meshrt.create_mesh_buffer(mesh_device, size={2 * MIB + 4096}, page_size=2048).deallocate()

        @pytest.mark.meshrt_limit(dram="lots")
        def test_bad_limit(mesh_device):
            pass
    """)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        f"*meshrt: device 0 DRAM peaked at {2 * MIB + 4096} bytes during the test, over the limit of {2 * MIB} "
        "bytes by 4096*",
    ])
    result.stdout.fnmatch_lines(["*meshrt_limit: 'lots' is not a size such as '64 MiB'*"])
    assert "lost the allocation server" not in result.stderr.str()


def test_a_child_process_that_keeps_buffers_counts_through_the_server(pytester):
    result = run(pytester, """
        import subprocess, sys, pytest
        children = []
        CHILD = ("import sys, meshrt; m = meshrt.open_mesh_device(meshrt.MeshShape(1, 1)); "
                 "b = meshrt.create_mesh_buffer(m, size=4096, page_size=2048, name='child'); "
                 "meshrt.flush_tracking(); print('ready', flush=True); sys.stdin.read()")

        @pytest.fixture(scope="module", autouse=True)
        def reap():
            yield
            for child in children:
                child.stdin.close()
                child.wait(timeout=60)

        @pytest.mark.meshrt_no_leaks
        def test_child_keeps_a_buffer():
            child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
            children.append(child)
            assert child.stdout.readline().strip() == "ready"
    """)
    result.assert_outcomes(failed=1)
    # Its buffer, and the system buffers of the mesh it never closed.
    result.stdout.fnmatch_lines(["*meshrt: 4 device buffers*still live*",
                                 "*'child') on device 0: dram, buffer, 4096 bytes, pid *"])


def test_a_child_that_dies_holding_buffers_during_the_test_fails_it(pytester):
    result = run(pytester, """
        import subprocess, sys, pytest
        CHILD = ("import os, meshrt; m = meshrt.open_mesh_device(meshrt.MeshShape(1, 1)); "
                 "b = meshrt.create_mesh_buffer(m, size=4096, page_size=2048); meshrt.flush_tracking(); os._exit(3)")

        @pytest.mark.meshrt_no_leaks
        def test_child_crashes():
            assert subprocess.run([sys.executable, "-c", CHILD]).returncode == 3

        @pytest.mark.meshrt_limit("64 MiB")
        def test_positional_limit():
            pass
    """)
    result.assert_outcomes(failed=2)
    # Its buffer and its mesh's 3 system buffers, reclaimed when it disconnected without Goodbye.
    result.stdout.fnmatch_lines(["*meshrt: processes that ended during this test still held 4 device buffers*"])
    result.stdout.fnmatch_lines(["*meshrt_limit takes dram= and l1= by name, not ('64 MiB',)*"])
