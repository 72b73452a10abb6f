"""Run untrusted generated Python programs (HumanEval, MBPP) behind several layers of isolation.

HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code") and MBPP (Austin et
al. 2021) score a model by running the code it wrote against unit tests. That code is untrusted: it
may loop forever, fork without end, allocate all memory, delete files, or open connections. Each
program runs in a fresh interpreter behind these layers; every one of them is reported per run
(`SandboxResult.layers`) and for the machine (`isolation_layers()`), so a results file says how its
code was run:

layer              what it stops                                what it does not stop
-----------------  -------------------------------------------  ---------------------------------------------
process_group      the program runs in its own session; the     a process that leaves the group (setsid
                   parent kills that process group with         through ctypes): the pid namespace and the
                   SIGKILL at the timeout and ALWAYS after the  uid sweep below catch those
                   program ends, so stray children die too
pid_namespace      the program is process 1 of a new pid        (needs unshare(CLONE_NEWPID): root, or
                   namespace: when it ends, the kernel kills    unprivileged user namespaces)
                   every process it started (double-forked,
                   setsid daemons included) and reaps them; it
                   cannot see or signal any process outside
network_namespace  a new network namespace has only a down      path-based Unix sockets are files: only file
                   loopback, so no connection can be made,      permissions (the uid below) protect them
                   even by code that bypasses the Python guard
unprivileged_uid   when lmlab runs as root, the program runs    writes to world-writable places (/tmp,
                   as a throwaway uid, fresh for each run:      /dev/shm) by code that bypasses the Python
                   file permissions apply, RLIMIT_NPROC         guard; reading world-readable files; seeing
                   applies, concurrent programs cannot signal   other processes' command lines in /proc
                   each other, and the parent finds and kills
                   every process the program left by its uid
read_confined      the program cannot read files its uid may    off when the interpreter is installed where
                   not read                                     only root can read it (pyenv under /root):
                                                                the program then keeps one capability,
                                                                CAP_DAC_READ_SEARCH, to import the standard
                                                                library, and can read any file
no_new_privs       executing a setuid binary cannot regain
                   privileges
rlimits            address space (memory), CPU seconds, file    filling the disk with many files, each under
                   size, open files; no core dumps              the size limit
process_limit      RLIMIT_NPROC on the processes and threads    off while the program still runs as root (the
                   of the uid: fork and thread storms stop      kernel does not enforce it for root)
python_guard       os.fork/system/kill/exec*/spawn*/setsid,     code that reaches around it: ctypes (which it
                   subprocess, multiprocessing and socket       blocks from import, but the block can be
                   creation raise PermissionError; open,        undone), _socket, _io, frame tricks. It is a
                   os.open, remove, rename, mkdir, chmod, ...   second layer that turns the common cases into
                   refuse paths outside the working directory   clear errors, not a boundary: the kernel
                   (after the "reliability guard" of the        layers above are the boundary
                   HumanEval harness)

Every program also runs in a throwaway working directory (deleted afterwards) with a minimal
environment: HOME and TMPDIR point into it, and nothing of the caller's environment (API keys,
tokens) is passed on. Writes are allowed inside that directory, so tempfile, shutil.rmtree and
TemporaryDirectory work there and fail outside.

How a run goes. The parent starts `python -I -B sandbox.py CONFIG` (this file, as a script) in a new
session. That child enters the isolation itself, in this order, because each step needs privileges
the next gives up: unshare the pid and network namespaces, switch to the throwaway uid, set the
resource limits, set no_new_privs. It then forks the program process (process 1 of the new pid
namespace), which installs the Python guard and runs the program as `__main__`; the child waits
for it, kills it at the timeout, and writes the verdict (exit status, CPU seconds used, whether it
timed out) to a report file the program cannot reach. The parent waits with a short grace beyond
the timeout as a backstop, then kills the process group and any process left with the throwaway uid,
and removes the directory. Without root, a new user namespace (our own uid mapped into it) gives
the capabilities for the pid and network namespaces, and the uid stays the user's.

Why a throwaway uid, fresh for each run, rather than the shared "nobody": RLIMIT_NPROC counts per
uid, so with a shared uid one program's fork storm would starve the programs running beside it
(run_programs runs several), and they could signal each other; and a uid of its own lets the
parent find every process a run left behind, even one that left the process group.

The isolation is entered in the child rather than in a `subprocess` `preexec_fn`: a preexec_fn runs
Python between fork and exec, which the subprocess documentation warns may deadlock when the parent
has threads (`run_programs` runs a thread pool), and a new pid namespace needs a fork after
unshare anyway. Not done here: cgroups (a hard memory and pid budget for a whole process tree,
which needs a delegated cgroup), a mount namespace with a private /tmp and /proc, seccomp filters.
For fully hostile code use a VM or gVisor as well; this sandbox is sized for model-written
benchmark solutions, whose failures are mostly accidents.

Statuses: "passed" (the program ran to its end and exited with status 0 within the timeout),
"failed" (any other ending), "timeout" (wall clock or CPU seconds), "memory" (MemoryError, or
killed by the kernel's OOM killer), "error" (the sandbox could not start or set up the program).
An exit with status 0 before the end (sys.exit(), exit()) skips the tests after it and so is
"failed", as in the HumanEval harness, which counts SystemExit as a failure; os._exit is refused.
Those checks are Python-level, like the guard: code that reaches around it (ctypes' _exit(0)) can
still end early with status 0, so under RL with test rewards also check completions for such
escapes. The verdict itself comes from the supervising child, whose
report the program cannot write: it cannot fake a timeout, and faking "memory" (exit code 86) only
hurts itself.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import types
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory", "error")
LAYERS = ("process_group", "pid_namespace", "network_namespace", "unprivileged_uid", "read_confined",
          "no_new_privs", "rlimits", "process_limit", "python_guard")

_CHILD_SCRIPT = os.path.abspath(__file__)
_TAIL_BYTES = 4096  # how much of the end of stdout and stderr a result keeps
_GRACE = 2.0  # seconds the parent allows beyond the timeout for the child's start and teardown
_MEMORY_EXIT = 86  # exit code of a program that died of MemoryError
_EARLY_EXIT = 87  # exit code of a program that exited with status 0 before its end (sys.exit(), exit())
# Throwaway uids: far above human (1000+), systemd dynamic (61184-65519) and container subuid ranges.
_UID_BASE, _UID_SPAN = 2_000_000_000, 100_000_000

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 4, 8, 38
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed program.

    timeout: wall-clock seconds. memory_mb: address space (RLIMIT_AS), which includes the
    interpreter itself (about 50 MiB). cpu_seconds: RLIMIT_CPU, default ceil(timeout) + 1, so a
    single-threaded program meets the wall clock first. file_size_mb: the largest file it may
    write (stdout and stderr included). max_processes: RLIMIT_NPROC, processes and threads of its
    uid, the sandbox's own two processes included. open_files: RLIMIT_NOFILE. network: allow
    network access (no network namespace, no socket guard)."""

    timeout: float = 10.0
    memory_mb: int = 1024
    cpu_seconds: int | None = None
    file_size_mb: int = 10
    max_processes: int = 64
    network: bool = False
    open_files: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < math.inf):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        minimums = {"memory_mb": 1, "file_size_mb": 1, "max_processes": 2, "open_files": 8}
        for name, low in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.cpu_seconds is not None and (not isinstance(self.cpu_seconds, int) or self.cpu_seconds < 1):
            raise ValueError(f"cpu_seconds must be None (meaning ceil(timeout) + 1) or an integer >= 1, "
                             f"got {self.cpu_seconds!r}")

    @property
    def cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout) + 1


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one program. returncode is the program's exit code (negative: killed by that
    signal), None when it never ran. stdout and stderr keep their last few KB. layers names the
    isolation layers that were active for this run (see LAYERS)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    layers: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --- program assembly ------------------------------------------------------------------------------

def _require(problem: dict, keys: Sequence[str], schema: str) -> None:
    missing = [k for k in keys if k not in problem]
    if missing:
        raise ValueError(f"{schema} problem {problem.get('task_id', '?')!r} lacks {missing}; expected the keys "
                         f"{list(keys)} (read it with lmlab.data.sources.records({schema.lower()!r}))")


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that checks one HumanEval completion, as the HumanEval harness builds it:
    prompt + completion + test + `check(entry_point)`."""
    _require(problem, ("prompt", "test", "entry_point"), "HumanEval")
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict, code: str) -> str:
    """The program that checks one MBPP solution: code, the setup code, then the assert lines of
    test_list (challenge_test_list is not part of the standard score)."""
    _require(problem, ("test_list", "test_setup_code"), "MBPP")
    return f"{code}\n\n{problem['test_setup_code']}\n" + "\n".join(problem["test_list"]) + "\n"


# --- the parent side -------------------------------------------------------------------------------

def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run one Python program in the sandbox and report how it ended (see the module docstring)."""
    if not isinstance(source, str):
        raise TypeError(f"source must be the program text as a str, got {type(source).__name__}")
    uid = _throwaway_uid() if os.geteuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="lmlab-sandbox-")
    try:
        return _run_in(workdir, source, limits, uid)
    finally:
        _remove_tree(workdir)


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), *, workers: int = 2,
                 progress: bool = False) -> list[SandboxResult]:
    """run_program over many programs, `workers` at a time; results in the order of `sources`."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda source: run_program(source, limits), sources)
        return list(tqdm(results, total=len(sources), desc="sandbox", unit="program", disable=not progress))


def isolation_layers(limits: SandboxLimits = SandboxLimits()) -> dict[str, bool]:
    """Which isolation layers a program gets on this machine, found by running an empty one."""
    result = run_program("pass", limits)
    if result.status != "passed":
        raise RuntimeError(f"the sandbox cannot run an empty program ({result.status}): {result.stderr}")
    return {name: name in result.layers for name in LAYERS}


def _run_in(workdir: str, source: str, limits: SandboxLimits, uid: int | None) -> SandboxResult:
    program, tmp = Path(workdir, "program.py"), Path(workdir, "tmp")
    program.write_text(source, encoding="utf-8")
    tmp.mkdir()
    if uid is not None:  # the program's uid must own its directory to write there
        for path in (workdir, program, tmp):
            os.chown(path, uid, uid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": str(tmp), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as report:
        config = {"workdir": workdir, "uid": uid, "limits": asdict(limits), "report_fd": report.fileno()}
        start = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-B", _CHILD_SCRIPT, json.dumps(config)], cwd=workdir,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(report.fileno(),), start_new_session=True)
        except OSError as e:
            return SandboxResult("error", None, "", f"could not start {sys.executable}: {e}", 0.0)
        exited = False
        try:
            exited = _wait_exit(proc.pid, limits.timeout + _GRACE)
        finally:
            # The child is not reaped yet, so its pid (= the group id) cannot be reused by then.
            _kill_leftovers(proc.pid, uid)
            proc.wait()
        duration = time.monotonic() - start
        report.seek(0)
        info: dict = {}
        for line in report.read().decode("utf-8", "replace").splitlines():
            with suppress(ValueError):  # a line cut short by a kill
                info.update(json.loads(line))
        stdout, stderr = _tail(out), _tail(err)
    layers = tuple(name for name in LAYERS if info.get("layers", {}).get(name))
    if "error" in info:
        return SandboxResult("error", None, stdout, stderr + info["error"], duration, layers)
    if "returncode" in info:
        status = _classify(info["returncode"], info["timed_out"], info["cpu_seconds"], limits.cpu_limit)
        return SandboxResult(status, info["returncode"], stdout, stderr, duration, layers)
    # No verdict: the parent's backstop fired, or the program took its supervisor down with it.
    status = "timeout" if not exited else "failed" if layers else "error"
    return SandboxResult(status, proc.returncode, stdout, stderr, duration, layers)


def _classify(returncode: int, timed_out: bool, cpu_seconds: float, cpu_limit: int) -> str:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == _MEMORY_EXIT:
        return "memory"
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_seconds >= cpu_limit - 0.05):
        return "timeout"  # RLIMIT_CPU: SIGKILL at the hard limit (SIGXCPU at a soft one); 0.05: tick rounding
    if returncode == -signal.SIGKILL:
        return "memory"  # nobody in the sandbox sent it: the kernel's OOM killer
    return "failed"


def _tail(file) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - _TAIL_BYTES))
    return file.read().decode("utf-8", "replace")


def _wait_exit(pid: int, timeout: float) -> bool:
    """True when child `pid` exits within `timeout` seconds. The child is left unreaped."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3, or not Linux): poll
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def _live_pids(pgid: int | None = None, uid: int | None = None) -> list[int]:
    """Processes (zombies excluded) in process group `pgid` or running as `uid`, read from /proc."""
    pids = []
    with suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                state, group = fields[0], int(fields[2])
                ids = ()
                if uid is not None:
                    ids = next(line.split()[1:] for line in Path(entry.path, "status").read_text().splitlines()
                               if line.startswith("Uid:"))
            except (OSError, IndexError, StopIteration):  # the process ended while we looked
                continue
            if state != "Z" and (group == pgid or str(uid) in ids):
                pids.append(int(entry.name))
    return pids


def _kill_leftovers(pgid: int, uid: int | None) -> None:
    """SIGKILL the process group, and every process of the throwaway uid, until none is left."""
    deadline = time.monotonic() + 5.0
    while True:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        left = _live_pids(pgid=pgid, uid=uid)
        for pid in left:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _throwaway_uid() -> int:
    """A uid no process uses: the program's own, so that the limits and the sweep count only it."""
    while True:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        if not _live_pids(uid=uid):
            return uid


def _remove_tree(path: str) -> None:
    """Delete the working directory, even where the program made parts of it unreadable."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError:
        os.chmod(path, stat.S_IRWXU)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                if not os.path.islink(os.path.join(dirpath, name)):
                    os.chmod(os.path.join(dirpath, name), stat.S_IRWXU)
        shutil.rmtree(path)


# --- the child side: `python -I -B sandbox.py CONFIG` ----------------------------------------------

def _child_main(config_json: str) -> None:
    """Enter the isolation, fork the program, supervise it, and write the verdict to the report."""
    config = json.loads(config_json)
    limits = SandboxLimits(**config["limits"])
    report = os.fdopen(config["report_fd"], "w", encoding="utf-8")
    try:
        layers = _enter_isolation(limits, config["uid"])
    except Exception:  # a setup step failed unexpectedly: run nothing, and say why
        report.write(json.dumps({"error": "sandbox setup failed:\n" + traceback.format_exc()}) + "\n")
        report.close()
        os._exit(1)
    report.write(json.dumps({"layers": layers}) + "\n")
    report.flush()
    pid = os.fork()
    if pid == 0:
        report.close()
        _run_guarded(config["workdir"], limits.network)
        return  # the program ended: this interpreter exits as it would after `python program.py`
    timed_out = not _wait_exit(pid, limits.timeout)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    report.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                             "cpu_seconds": usage.ru_utime + usage.ru_stime}) + "\n")
    report.close()


def _enter_isolation(limits: SandboxLimits, uid: int | None) -> dict[str, bool]:
    """Namespaces, then the uid, then the limits: each step needs privileges the next gives up."""
    libc = _libc()
    # RLIMIT_NPROC counts all processes of a uid: a throwaway uid has none, a user's own uid many.
    nproc = limits.max_processes + (len(_live_pids(uid=os.getuid())) if uid is None else 0)
    layers = {"process_group": os.getpgid(0) == os.getpid()}
    layers["pid_namespace"], layers["network_namespace"] = _unshare(libc, limits.network)
    kept_read = _drop_privileges(libc, uid) if uid is not None else False
    layers["unprivileged_uid"] = os.geteuid() != 0
    layers["read_confined"] = layers["unprivileged_uid"] and not kept_read
    layers["rlimits"] = _set_rlimits(limits, nproc)
    layers["process_limit"] = layers["rlimits"] and layers["unprivileged_uid"]
    layers["no_new_privs"] = libc is not None and _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    if libc is not None:  # so that a program of the same uid cannot open our report through /proc/<pid>/fd
        _prctl(libc, PR_SET_DUMPABLE, 0)
    layers["python_guard"] = True
    return layers


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _prctl(libc: ctypes.CDLL, option: int, arg: int) -> bool:
    ulong = ctypes.c_ulong
    return libc.prctl(ctypes.c_int(option), ulong(arg), ulong(0), ulong(0), ulong(0)) == 0


def _unshare(libc: ctypes.CDLL | None, network: bool) -> tuple[bool, bool]:
    """New pid and network namespaces; (pid namespace, network namespace) tell which worked. Where
    unshare is refused (seccomp, old kernels) the run goes on without that layer.

    Without root, a new user namespace comes first: it grants the capabilities the other two need.
    Our own uid and gid are mapped into it unchanged (unmapped, we could not create files), and
    once the namespaces exist every capability is dropped again."""
    if libc is None or not hasattr(libc, "unshare"):
        return False, False
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        if libc.unshare(CLONE_NEWUSER) != 0:
            return False, False
        Path("/proc/self/setgroups").write_text("deny")  # required before an unprivileged gid_map
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    pid_ns = libc.unshare(CLONE_NEWPID) == 0
    net_ns = not network and libc.unshare(CLONE_NEWNET) == 0
    if uid != 0:
        _set_capabilities(libc, 0)
    return pid_ns, net_ns


def _drop_privileges(libc: ctypes.CDLL | None, uid: int) -> bool:
    """Switch from root to the throwaway uid (and gid, no groups). Returns whether the process kept
    CAP_DAC_READ_SEARCH, which it does only when other users cannot read the interpreter's
    libraries (it could not import the standard library otherwise). If the switch itself is
    refused (a user namespace without that uid), the program stays root: layer unprivileged_uid off."""
    keep_read = libc is not None and not all(_readable_by_others(p) for p in _interpreter_paths())
    if keep_read and not _prctl(libc, PR_SET_KEEPCAPS, 1):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS) failed")
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError:
        return False
    if keep_read:
        _set_capabilities(libc, 1 << CAP_DAC_READ_SEARCH)  # and drop every other one
    return keep_read


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _set_capabilities(libc: ctypes.CDLL, mask: int) -> None:
    """capset(2): effective = permitted = mask (capabilities 0-31), nothing inheritable."""
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    data[0].effective = data[0].permitted = mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _interpreter_paths() -> list[str]:
    paths = sysconfig.get_paths()
    return [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if os.path.isdir(paths[key])]


def _readable_by_others(path: str) -> bool:
    """Whether a user with no group in common can list `path` (every ancestor searchable)."""
    resolved = Path(path).resolve()
    if not all(os.stat(p).st_mode & stat.S_IXOTH for p in resolved.parents):
        return False
    mode = os.stat(resolved).st_mode
    return bool(mode & stat.S_IROTH and mode & stat.S_IXOTH)


def _set_rlimits(limits: SandboxLimits, nproc: int) -> bool:
    """Soft = hard, so the program cannot raise them back; False if one was refused."""
    mib = 2**20
    wanted = [(resource.RLIMIT_AS, limits.memory_mb * mib, limits.memory_mb * mib),
              # soft = hard: SIGKILL at the limit. (A SIGXCPU at a lower soft limit would be ignored by
              # the program, which as process 1 of its pid namespace ignores signals it has no handler for.)
              (resource.RLIMIT_CPU, limits.cpu_limit, limits.cpu_limit),
              (resource.RLIMIT_FSIZE, limits.file_size_mb * mib, limits.file_size_mb * mib),
              (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
              (resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_NPROC, nproc, nproc)]
    ok = True
    for which, soft, hard in wanted:
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError):
            ok = False
    return ok


def _run_guarded(workdir: str, network: bool) -> None:
    """In the program process: install the Python guard and run program.py as __main__."""
    sys.excepthook = _program_excepthook
    path = os.path.join(workdir, "program.py")
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    module = types.ModuleType("__main__")
    module.__file__ = path
    sys.modules["__main__"], sys.argv = module, [path]
    exit_now = os._exit  # the guard takes os._exit away from the program
    _install_guard(workdir, network)
    try:
        exec(code, module.__dict__)
    except MemoryError:
        _program_excepthook(*sys.exc_info())
        sys.stdout.flush()
        exit_now(_MEMORY_EXIT)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise  # a failure exit: the interpreter exits with that status, as usual
        # An exit with status 0 before the end skips the tests after it, so it is not a pass (the
        # HumanEval harness counts SystemExit as a failure too); it is the cheapest way to fake one.
        print("lmlab sandbox: the program called exit with status 0 before it reached its end; the tests after "
              "that point did not run, so this counts as a failure", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        exit_now(_EARLY_EXIT)


def _program_excepthook(kind, value, tb) -> None:
    """Print a traceback that starts in the program, as `python program.py` would."""
    while tb is not None and tb.tb_frame.f_code.co_filename == _CHILD_SCRIPT:
        tb = tb.tb_next
    sys.__excepthook__(kind, value.with_traceback(tb), tb)


# Functions that start processes, signal them, change identity, or end the program before its tests ran (_exit):
# refused. putenv stays: the environment is already minimal, and numpy calls it on import.
_REFUSED = ("_exit", "fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid", "setpgrp",
            "posix_spawn", "posix_spawnp", "pidfd_open", "link", "chroot", "setuid", "seteuid", "setreuid",
            "setresuid", "setgid", "setegid", "setregid", "setresgid", "setgroups")
# Functions that change the file system: allowed inside the working directory only.
_CONFINED = ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir", "makedirs",
             "chmod", "lchmod", "chown", "lchown", "truncate", "utime", "symlink", "mkfifo", "mknod",
             "chflags", "lchflags", "setxattr", "removexattr")
# Modules that reach around the guard or the limits (a program can still un-block them: a second layer).
_BLOCKED_MODULES = ("ctypes", "_ctypes", "resource", "psutil")


def _install_guard(workdir: str, network: bool) -> None:
    """The Python-level guard, after the "reliability guard" of the HumanEval harness: process,
    signal and identity functions raise PermissionError; file-system changes are confined to the
    working directory rather than disabled (as HumanEval's guard does), so that tempfile,
    TemporaryDirectory and shutil.rmtree keep working there; sockets are refused unless network
    access was allowed. Paths are compared after resolving symlinks and `..`, and relative to a
    dir_fd where one is given."""
    import _posixsubprocess
    import builtins
    import io
    import posix
    import socket

    root = os.path.realpath(workdir)

    def inside(path, dir_fd: int | None = None) -> bool:
        if isinstance(path, int):
            return True  # an open descriptor: it was checked when it was opened
        path = os.fsdecode(path)
        if dir_fd is not None:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        resolved = os.path.realpath(path)
        return resolved == root or resolved.startswith(root + os.sep) or resolved == os.devnull

    def refused(name: str):
        def refuse(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the lmlab sandbox")
        return refuse

    def confined(name: str, func):
        def check(*args, **kwargs):
            if kwargs.get("src_dir_fd") is not None or kwargs.get("dst_dir_fd") is not None:
                raise PermissionError(f"{name} with src_dir_fd/dst_dir_fd is disabled in the lmlab sandbox")
            dir_fd = kwargs.get("dir_fd")
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg, dir_fd):
                    raise PermissionError(f"{name}({arg!r}): only the working directory {root} may be changed "
                                          "in the lmlab sandbox")
            return func(*args, **kwargs)
        return check

    real_open, real_os_open = builtins.open, os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"open({file!r}, {mode!r}): only files in the working directory {root} may "
                                  "be written in the lmlab sandbox")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writing and not inside(path, dir_fd):
            raise PermissionError(f"os.open({path!r}): only files in the working directory {root} may be "
                                  "written in the lmlab sandbox")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open
    for module in (os, posix):
        for name in dir(module):
            if name in _REFUSED or name.startswith(("exec", "spawn")):
                setattr(module, name, refused(f"os.{name}"))
            elif name in _CONFINED:
                setattr(module, name, confined(f"os.{name}", getattr(module, name)))
        module.open = guarded_os_open
    _posixsubprocess.fork_exec = refused("starting a process")  # subprocess and multiprocessing use it

    class NoPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError("subprocess is disabled in the lmlab sandbox")

        def __del__(self):
            pass

    subprocess.Popen = NoPopen
    if not network:
        class NoSocket(socket.socket):  # a subclass, so that `class X(socket.socket)` still imports
            def __init__(self, *args, **kwargs):
                raise PermissionError("network access is disabled in the lmlab sandbox")

            def __del__(self):
                pass

        socket.socket = NoSocket
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None


if __name__ == "__main__":
    _child_main(sys.argv[1])
