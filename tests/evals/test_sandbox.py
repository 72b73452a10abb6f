"""The sandbox contains each threat, and the host is untouched afterwards.

Most threats are tried twice: the plain way, which the Python guard refuses with a clear error, and
through ctypes/_socket/_io, which reaches around the guard, to show that the kernel layers (pid and
network namespaces, the throwaway uid, RLIMIT_NPROC) hold on their own. Those second tests need the
layer on this machine: they skip when it is absent, and fail under CI.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from lmlab.evals import sandbox
from lmlab.evals.sandbox import (
    LAYERS,
    SandboxLimits,
    SandboxResult,
    humaneval_program,
    isolation_layers,
    mbpp_program,
    run_program,
    run_programs,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's isolation layers are Linux's")

QUICK = SandboxLimits(timeout=5.0)
# Un-blocks ctypes, which the guard blocks, to reach around the guard as hostile code could.
BYPASS = textwrap.dedent("""\
    import os, sys, time
    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    import ctypes
    libc = ctypes.CDLL(None)
    print(os.getcwd(), flush=True)
""")
WHERE = "import os\nprint(os.getcwd(), flush=True)\n"  # first stdout line: the run's working directory


@pytest.fixture(scope="module")
def layers() -> dict[str, bool]:
    return isolation_layers()


def need(layers: dict[str, bool], name: str) -> None:
    if not layers[name]:
        reason = f"the sandbox's {name!r} layer is not available on this machine"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide it")
        pytest.skip(reason)


def live_processes(marker: str) -> list[int]:
    """Processes (zombies excluded) whose command line names `marker`: the sandbox child's command
    line holds its working directory, and every process forked from the program inherits it."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().decode("utf-8", "replace")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def workdir_of(result: SandboxResult) -> str:
    workdir = result.stdout.split("\n", 1)[0]
    assert os.path.basename(workdir).startswith("lmlab-sandbox-"), result
    return workdir


def assert_host_fine(result: SandboxResult) -> None:
    """Nothing of the run is alive, its directory is gone, and this process can still fork."""
    workdir = workdir_of(result)
    assert live_processes(workdir) == []
    assert not os.path.exists(workdir)
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert os.waitpid(pid, 0)[1] == 7 << 8


# --- ordinary programs -----------------------------------------------------------------------------


def test_correct_program_passes():
    r = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n", QUICK)
    assert (r.status, r.returncode, r.stdout, r.stderr, r.passed) == ("passed", 0, "ok\n", "", True)
    assert "python_guard" in r.layers and "process_group" in r.layers
    assert 0 < r.duration < QUICK.timeout


def test_failing_assertion_fails_with_a_traceback_that_starts_in_the_program():
    r = run_program("def f():\n    assert 1 + 1 == 3\n\nf()\n", QUICK)
    assert (r.status, r.returncode, r.passed) == ("failed", 1, False)
    assert r.stderr.startswith("Traceback (most recent call last):\n  File ")
    assert r.stderr.rstrip().endswith("AssertionError")
    assert "program.py\", line 4" in r.stderr and "sandbox.py" not in r.stderr


def test_syntax_error_and_exit_codes():
    assert run_program("def f(:\n", QUICK).status == "failed"
    r = run_program("import sys\nsys.exit(3)\n", QUICK)
    assert (r.status, r.returncode) == ("failed", 3)


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "exit()", "raise SystemExit",
                                       "import os\nos._exit(0)"])
def test_exiting_with_status_0_before_the_tests_is_not_a_pass(exit_call):
    r = run_program(f"def f():\n    return 1\n\n{exit_call}\nassert f() == 2\n", QUICK)
    assert r.status == "failed"


def test_environment_holds_no_secrets_and_points_into_the_workdir(monkeypatch):
    monkeypatch.setenv("LMLAB_TEST_API_KEY", "sk-secret-value")
    program = textwrap.dedent("""\
        import os, tempfile
        assert "LMLAB_TEST_API_KEY" not in os.environ, "secret leaked"
        assert "sk-secret-value" not in repr(dict(os.environ))
        cwd = os.getcwd()
        assert os.environ["HOME"] == cwd and os.environ["TMPDIR"].startswith(cwd + os.sep), dict(os.environ)
        fd, path = tempfile.mkstemp()
        os.close(fd)
        os.remove(path)
        with tempfile.TemporaryDirectory() as d:  # writes and removal inside the working directory work
            open(os.path.join(d, "a.txt"), "w").write("x")
        print(sorted(os.environ))
    """)
    r = run_program(program, QUICK)
    assert r.passed, r.stderr
    assert "LMLAB_TEST_API_KEY" not in r.stdout


def test_workdir_is_removed_afterwards():
    r = run_program(WHERE + "open('data.txt', 'w').write('x' * 1000)\nos.mkdir('sub')\nos.chmod('sub', 0)\n", QUICK)
    assert r.passed, r.stderr
    assert not os.path.exists(workdir_of(r))


def test_output_keeps_only_a_tail():
    r = run_program("print('x' * 100_000)\nprint('END')\n", QUICK)
    assert r.passed and len(r.stdout) == sandbox._TAIL_BYTES and r.stdout.endswith("x\nEND\n")


def test_file_size_limit():
    r = run_program("open('big.bin', 'wb').write(b'0' * (2 * 2**20))\n", SandboxLimits(timeout=5.0, file_size_mb=1))
    assert r.status == "failed" and "File too large" in r.stderr


# --- threats ---------------------------------------------------------------------------------------


def test_infinite_loop_times_out():
    limits = SandboxLimits(timeout=1.0)
    r = run_program(WHERE + "while True:\n    pass\n", limits)
    assert r.status == "timeout" and not r.passed
    assert limits.timeout <= r.duration < limits.timeout + 1.5
    assert_host_fine(r)


def test_cpu_seconds_limit():
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout=30.0, cpu_seconds=1))
    assert (r.status, r.returncode) == ("timeout", -signal.SIGKILL)
    assert r.duration < 20.0  # the CPU limit, not the 30 s wall clock, ended it


@pytest.mark.parametrize("storm", [
    "while True:\n    os.fork()\n",
    "import subprocess\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])\n",
    "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()\n",
    "import multiprocessing\nmultiprocessing.set_start_method('spawn')\nwhile True:\n"
    "    multiprocessing.Process(target=print).start()\n",
    "while True:\n    os.system('true')\n",
])
def test_fork_storm_is_refused_by_the_guard(storm):
    r = run_program(WHERE + "import sys\n" + storm, QUICK)
    assert r.status == "failed"
    assert "disabled in the lmlab sandbox" in r.stderr
    assert_host_fine(r)


def test_fork_storm_through_ctypes_is_contained(layers):
    need(layers, "process_limit")
    r = run_program(BYPASS + "while True:\n    libc.fork()\n", SandboxLimits(timeout=1.5, max_processes=32))
    assert r.status == "timeout"
    assert_host_fine(r)


def test_process_limit_caps_forks(layers):
    need(layers, "process_limit")
    program = BYPASS + textwrap.dedent("""\
        count = 0
        while True:
            pid = libc.fork()
            if pid == 0:
                time.sleep(60)  # children wait; the end of the program ends them
            if pid < 0:
                break
            count += 1
        print(count)
    """)
    limits = SandboxLimits(timeout=5.0, max_processes=12)
    r = run_program(program, limits)
    assert r.passed, r.stderr
    count = int(r.stdout.split()[1])
    if os.geteuid() == 0:  # a throwaway uid holds only the sandbox's two processes: 12 - 2 forks succeed
        assert count == limits.max_processes - 2
    else:  # the limit is raised by the processes the user already runs (they count against it too)
        assert count <= limits.max_processes + len(sandbox._live_pids(uid=os.getuid()))
    assert_host_fine(r)


def test_huge_allocation_is_a_memory_error():
    r = run_program(WHERE + "x = bytearray(8 * 2**30)\n", QUICK)
    assert (r.status, r.returncode) == ("memory", sandbox._MEMORY_EXIT)
    assert "MemoryError" in r.stderr
    assert_host_fine(r)
    assert len(bytearray(64 * 2**20)) == 64 * 2**20  # the limit was the child's alone


@pytest.mark.parametrize("attack", [
    "open(TARGET, 'w').write('pwned')",
    "open(TARGET, 'a').write('pwned')",
    "os.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path(TARGET).write_text('pwned')",
    "import pathlib\npathlib.Path(TARGET).touch()",
    "os.symlink(TARGET, 'link')\nopen('link', 'w').write('pwned')",
    "open('../' * 20 + TARGET.lstrip('/'), 'w').write('pwned')",
    "import shutil\nopen('mine.txt', 'w').write('pwned')\nshutil.move('mine.txt', TARGET)",
])
def test_writes_outside_the_workdir_are_refused(tmp_path, attack):
    target = tmp_path / "outside.txt"
    r = run_program(WHERE + f"TARGET = {str(target)!r}\n" + attack + "\n", QUICK)
    assert r.status == "failed"
    assert "lmlab sandbox" in r.stderr
    assert not target.exists()
    assert_host_fine(r)


@pytest.mark.parametrize("attack", [
    "os.remove(KEEP)",
    "os.rename(KEEP, KEEP + '.moved')",
    "import shutil\nshutil.rmtree(os.path.dirname(KEEP))",
    "os.chmod(KEEP, 0o777)",
    "os.truncate(KEEP, 0)",
])
def test_changes_outside_the_workdir_are_refused(tmp_path, attack):
    keep = tmp_path / "keep" / "precious.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    keep.chmod(0o600)
    r = run_program(WHERE + f"KEEP = {str(keep)!r}\n" + attack + "\n", QUICK)
    assert r.status == "failed" and "lmlab sandbox" in r.stderr
    assert keep.read_text() == "precious" and keep.stat().st_mode & 0o777 == 0o600
    assert_host_fine(r)


def test_write_outside_through_io_bypass_is_stopped_by_file_permissions(tmp_path, layers):
    need(layers, "unprivileged_uid")
    target = tmp_path / "outside.txt"
    os.chmod(tmp_path, 0o755)  # the program may look in, but the directory is not its own to write
    r = run_program(BYPASS + f"import _io\n_io.open({str(target)!r}, 'w').write('pwned')\n", QUICK)
    assert r.status == "failed" and "Permission denied" in r.stderr
    assert not target.exists()
    assert_host_fine(r)


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def accepted(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


def test_network_connection_is_refused(listener):
    port = listener.getsockname()[1]
    r = run_program(WHERE + f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", QUICK)
    assert r.status == "failed" and "network access is disabled" in r.stderr
    assert not accepted(listener)
    assert_host_fine(r)


def test_network_connection_through_socket_bypass_is_refused(listener, layers):
    need(layers, "network_namespace")
    port = listener.getsockname()[1]
    connect = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
    r = run_program(WHERE + connect, QUICK)
    assert r.status == "failed" and "Network is unreachable" in r.stderr
    assert not accepted(listener)
    assert_host_fine(r)


def test_network_when_allowed(listener):
    """The positive control: with network=True the same connection goes through."""
    port = listener.getsockname()[1]
    r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n",
                    SandboxLimits(timeout=5.0, network=True))
    assert r.passed, r.stderr
    assert accepted(listener)
    assert "network_namespace" not in r.layers


def test_daemon_through_os_fork_is_refused():
    r = run_program(WHERE + "if os.fork() == 0:\n    os.setsid()\n", QUICK)
    assert r.status == "failed" and "os.fork is disabled" in r.stderr
    assert_host_fine(r)


@pytest.mark.parametrize("leave_group", [False, True], ids=["double-fork", "double-fork-setsid"])
def test_daemon_that_outlives_the_program_is_killed(layers, leave_group):
    if leave_group and not (layers["pid_namespace"] or layers["unprivileged_uid"]):
        need(layers, "pid_namespace")  # a process that left the group is found only by these layers
    program = BYPASS + textwrap.dedent(f"""\
        if libc.fork() == 0:
            if {leave_group}:
                libc.setsid()
            if libc.fork() == 0:
                time.sleep(60)
            libc._exit(0)
        time.sleep(0.3)  # the daemon is up when the program ends
    """)
    r = run_program(program, QUICK)
    assert r.passed, r.stderr
    assert_host_fine(r)


# --- the API ---------------------------------------------------------------------------------------


def test_isolation_layers(layers):
    assert list(layers) == list(LAYERS)
    assert all(isinstance(v, bool) for v in layers.values())
    assert layers["python_guard"] and layers["process_group"] and layers["rlimits"]


def test_run_programs_keeps_order_and_mixes_statuses():
    sources = [f"print({i})" for i in range(5)] + ["assert False", "while True: pass"]
    results = run_programs(sources, SandboxLimits(timeout=1.0), workers=2)
    assert [r.stdout for r in results[:5]] == [f"{i}\n" for i in range(5)]
    assert [r.status for r in results] == ["passed"] * 5 + ["failed", "timeout"]
    with pytest.raises(ValueError, match="workers"):
        run_programs(sources, workers=0)


def test_sandbox_that_cannot_start_is_an_error(monkeypatch):
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python")
    r = run_program("pass", QUICK)
    assert (r.status, r.returncode) == ("error", None)
    assert "/nonexistent/python" in r.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": 0}, "timeout"),
    ({"timeout": float("inf")}, "timeout"),
    ({"memory_mb": 0}, "memory_mb"),
    ({"max_processes": 1}, "max_processes"),
    ({"cpu_seconds": 0}, "cpu_seconds"),
    ({"open_files": 2}, "open_files"),
])
def test_limits_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SandboxLimits(**kwargs)


def test_default_cpu_limit():
    assert SandboxLimits(timeout=2.5).cpu_limit == 4
    assert SandboxLimits(timeout=2.5, cpu_seconds=9).cpu_limit == 9


@pytest.mark.parametrize("returncode, timed_out, cpu, status", [
    (0, False, 0.1, "passed"),
    (0, True, 0.1, "timeout"),
    (1, False, 0.1, "failed"),
    (sandbox._MEMORY_EXIT, False, 0.1, "memory"),
    (sandbox._EARLY_EXIT, False, 0.1, "failed"),
    (-signal.SIGXCPU, False, 3.0, "timeout"),
    (-signal.SIGKILL, False, 3.0, "timeout"),  # RLIMIT_CPU (cpu limit 3)
    (-signal.SIGKILL, False, 0.5, "memory"),   # the OOM killer
    (-signal.SIGSEGV, False, 0.5, "failed"),
])
def test_classification(returncode, timed_out, cpu, status):
    assert sandbox._classify(returncode, timed_out, cpu, 3) == status


def test_program_assembly():
    problem = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
               "test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"}
    assert humaneval_program(problem, "    return x\n") == (
        "def f(x):\n    return x\n\n\ndef check(candidate):\n    assert candidate(1) == 1\n\n\ncheck(f)\n")
    mbpp = {"task_id": 11, "text": "t", "code": "def g():\n    return 2",
            "test_list": ["assert g() == 2", "assert g()"], "test_setup_code": "import math", "challenge_test_list": []}
    assert mbpp_program(mbpp, mbpp["code"]) == (
        "def g():\n    return 2\n\nimport math\nassert g() == 2\nassert g()\n")
    with pytest.raises(ValueError, match="entry_point"):
        humaneval_program({"task_id": "x", "prompt": "", "test": ""}, "")
    with pytest.raises(ValueError, match="test_list"):
        mbpp_program({"task_id": 1}, "")


# --- the real benchmarks ---------------------------------------------------------------------------


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(shared_data, monkeypatch):
    from lmlab.data.sources import records

    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    problems = list(records("humaneval", download=False, progress=False))
    assert len(problems) == 164
    results = run_programs([humaneval_program(p, p["canonical_solution"]) for p in problems], workers=2)
    failures = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(problems, results, strict=True)
                if not r.passed]
    assert failures == []
    sample = problems[::4]  # 41 problems: enough to see that a wrong completion fails
    wrong = run_programs([humaneval_program(p, "    return None\n") for p in sample], workers=2)
    assert sum(r.passed for r in wrong) <= len(sample) // 10
    assert {r.status for r in wrong} == {"failed"}


def test_mbpp_reference_code_passes(shared_data, monkeypatch):
    from lmlab.data.sources import records

    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    problems = [p for p in records("mbpp", "test", download=False, progress=False) if p["task_id"] <= 60]
    assert [p["task_id"] for p in problems] == list(range(11, 61))
    results = run_programs([mbpp_program(p, p["code"]) for p in problems], workers=2)
    assert [(p["task_id"], r.status) for p, r in zip(problems, results, strict=True) if not r.passed] == []
