"""Run an untrusted Python program in a sandbox: no network, its own empty directory, limits on everything.

One run = one fresh process tree (docs/code_rl.md says what each backend isolates and what it does not):

* **bwrap** (bubblewrap, preferred): new network, PID, IPC and UTS namespaces; a filesystem of read-only binds
  of `/usr` and the interpreter's prefix only (no `/home`, `/root`, `/etc`, `/var`, `/run`: no secrets on disk),
  a private `/proc` and `/dev`, a tmpfs `/tmp`, and the run's empty directory at `/sandbox`, the only writable
  place that outlives the run's tmpfs. Started as root, the program's host uid is a non-root `uid` with every
  capability dropped (`setpriv`); started as a user, bwrap makes a user namespace of that user.
* **unshare** (util-linux, the fallback): new network, PID (with its own `/proc`), mount, IPC and UTS
  namespaces and the same uid drop; every host mount is remounted read-only inside (best effort: a mount the
  kernel refuses to remount stays as it was) and private tmpfs cover `/tmp`, `/var/tmp`, `/dev/shm`, `/run/lock`;
  but the host filesystem stays visible: the program reads whatever any uid may read (world-readable files under
  `/etc`, `/home`, ...), though it can write only its own directory.
* **insecure** (only when asked for by name): a plain child process with the same limits, a scrubbed environment
  and its own directory: no network, filesystem or process isolation at all.

Every backend gets an empty environment (`PATH`, `HOME`, `LANG` only), `prlimit` limits on CPU seconds, address
space, processes (per host uid, so one uid per concurrent run), open files, file size and core dumps, and a
wall-clock kill of the whole tree: the group is SIGKILLed and, for the namespaced backends, the death of the
namespace's init kills every process in it. Output is read up to `output_bytes` per stream; a program that
writes more is killed at once (`RunResult.overflow`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

BACKENDS = ("bwrap", "unshare", "insecure")
SANDBOX_DIR = "/sandbox"
"""Where the run's directory appears inside a bwrap sandbox."""
BASE_UID = 61000
"""Host uid of the first concurrent run when the service runs as root (each slot gets its own uid)."""
REPORT_FD = "@REPORT_FD@"
"""Placeholder in `Sandbox.run`'s args for the report pipe's descriptor number."""
_CHUNK = 65536


@dataclass(frozen=True)
class Limits:
    """Per-run limits; `wall_s` is wall clock (the whole tree is killed), `cpu_s` is RLIMIT_CPU."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    nproc: int = 32
    nofile: int = 64
    fsize_mb: int = 16
    output_bytes: int = 1 << 20


@dataclass(frozen=True)
class RunResult:
    """What came back from one run: exit code (negative = killed by that signal), capped outputs, the report
    channel's bytes, and whether the wall clock or the output cap ended it."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    report: bytes
    timed_out: bool
    overflow: bool
    elapsed_s: float


class SandboxUnavailable(ValueError):
    """No backend that isolates can run here, and the insecure one was not asked for (a configuration error:
    `gtpo eval` reports it in one line)."""


def _works(argv: list[str], cwd: str) -> bool:
    try:
        return (
            subprocess.run(argv, capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"}, cwd=cwd).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@cache
def available(backend: str) -> bool:
    """Whether `backend` can create its namespaces on this machine (tried once, by running `true` in it)."""
    if backend == "insecure":
        return True
    if shutil.which("prlimit") is None or (os.geteuid() == 0 and shutil.which("setpriv") is None):
        return False
    if backend not in ("bwrap", "unshare"):
        raise ValueError(f"backend: one of {BACKENDS}, got {backend!r}")
    if shutil.which(backend) is None:
        return False
    # the whole chain, as a run makes it: namespaces, mounts, uid drop, limits and the interpreter
    with tempfile.TemporaryDirectory(prefix="gtpo-probe-") as workdir:
        uid = BASE_UID if os.geteuid() == 0 else None
        if uid is not None:
            os.chown(workdir, uid, uid)
        argv, _ = command(backend, workdir, [interpreter(), "-I", "-c", "pass"], Limits(), uid)
        return _works(argv, workdir)


def pick_backend(requested: str = "auto") -> str:
    """`auto` -> bwrap, else unshare; never `insecure` unless it is requested by name.

    Raises:
        SandboxUnavailable: the requested backend (or, for auto, either isolating one) cannot run here.
    """
    if requested == "auto":
        for name in ("bwrap", "unshare"):
            if available(name):
                return name
        raise SandboxUnavailable(
            "neither bubblewrap nor unshare can create namespaces here (a container without user namespaces?); "
            "install bubblewrap, run privileged enough for namespaces, or set the sandbox to 'insecure' knowingly"
        )
    if not available(requested):
        raise SandboxUnavailable(f"the {requested!r} sandbox cannot run on this machine")
    return requested


@cache
def interpreter() -> str:
    """The Python programs run on: the system's `python3` (under /usr: inside every backend's view, and readable by
    the dropped uid), else this service's own interpreter. Programs get the standard library only, either way."""
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    return os.path.realpath(system) if system else os.path.realpath(sys.executable)


def _python_dirs() -> list[str]:
    """The interpreter's installation, when it is not under /usr: what bwrap binds read-only besides /usr."""
    if interpreter().startswith("/usr/"):
        return []
    prefix = os.path.realpath(sys.base_prefix)
    return [] if prefix == "/usr" or prefix.startswith("/usr/") else [prefix]


def _bwrap_args() -> list[str]:
    args = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]  # fmt: skip
    if os.geteuid() != 0:
        args.append("--unshare-user")  # as root the uid drop (setpriv) does what a user namespace would
    for name in ("bin", "sbin", "lib", "lib64", "lib32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for d in _python_dirs():
        # bwrap makes missing parents 0700 (root's): the dropped uid could not reach the interpreter
        parents = [str(p) for p in reversed(Path(d).parents) if str(p) != "/"]
        args += [a for p in parents for a in ("--perms", "0755", "--dir", p)] + ["--ro-bind", d, d]
    return [*args, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"][1:]


def _unshare_args() -> list[str]:
    args = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc", "--uts"]
    return args if os.geteuid() == 0 else [*args, "--user", "--map-root-user"]


_PRIVATE_TMP = (
    'w="$PWD"; mount --bind "$w" "$w" && cd "$w" || exit 125; '
    'while read -r _ m _; do [ "$m" = "$w" ] || mount -o remount,bind,ro "$m" 2>/dev/null; done < /proc/self/mounts; '
    'for d in /tmp /var/tmp /dev/shm /run/lock; do if [ -d "$d" ]; then mount -t tmpfs -o size=64m,nosuid,nodev '
    'tmpfs "$d" || exit 125; fi; done; exec "$@"'
)
"""The unshare backend's first step, as root of its mount namespace: its own directory becomes a mount of its own,
every other mount is remounted read-only (in this namespace only), and fresh tmpfs cover the usual world-writable
directories; the program's cwd stays its directory (reachable, writable, though its path is hidden)."""


def tasks_of_uid(uid: int) -> int:
    """Tasks (threads included: what RLIMIT_NPROC counts) of host uid `uid` now, from /proc."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid == uid:
                total += sum(1 for _ in (proc / "task").iterdir())
        except OSError:  # gone meanwhile
            continue
    return total


def _limits_args(limits: Limits, uid: int | None) -> list[str]:
    """setpriv (uid drop, when root) and prlimit. Without a uid of its own, the program shares the service's uid, whose
    tasks RLIMIT_NPROC also counts: the cap is then `nproc` above what that uid runs now."""
    nproc = limits.nproc if uid is not None else limits.nproc + tasks_of_uid(os.getuid())
    drop = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                   "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]  # fmt: skip
    mb = 1024 * 1024
    return [*drop, "prlimit", f"--cpu={limits.cpu_s}", f"--as={limits.memory_mb * mb}", f"--nproc={nproc}",
            f"--nofile={limits.nofile}", f"--fsize={limits.fsize_mb * mb}", "--core=0", "--"]  # fmt: skip


def command(backend: str, workdir: str, argv: list[str], limits: Limits, uid: int | None) -> tuple[list[str], str]:
    """The full command line for one run, and the directory the program sees as its own."""
    tail = [*_limits_args(limits, uid), *argv]
    if backend == "bwrap":
        return ["bwrap", *_bwrap_args(), "--bind", workdir, SANDBOX_DIR, "--chdir", SANDBOX_DIR, *tail], SANDBOX_DIR
    if backend == "unshare":
        return [*_unshare_args(), "sh", "-c", _PRIVATE_TMP, "sh", *tail], workdir
    if backend == "insecure":
        return tail, workdir
    raise ValueError(f"backend: one of {BACKENDS}, got {backend!r}")


def _env(home: str) -> dict[str, str]:
    # nothing from the service's environment: no REDIS_URL, no tokens, no PYTHON* variables
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group; a namespace dies with its init
    proc.kill()


def _pump(
    proc: subprocess.Popen[bytes], report_r: int, limits: Limits, t0: float
) -> tuple[dict[int, bytes], bool, bool]:
    """Read stdout, stderr and the report pipe until all close, the wall clock runs out or a stream overflows."""
    assert proc.stdout is not None and proc.stderr is not None
    fds = [proc.stdout.fileno(), proc.stderr.fileno(), report_r]
    got: dict[int, bytearray] = {fd: bytearray() for fd in fds}
    timed_out = overflow = False
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = t0 + limits.wall_s - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, _CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                got[key.fd] += chunk
                if len(got[key.fd]) > limits.output_bytes:
                    overflow = True
            if overflow:
                break
    return {fd: bytes(b[: limits.output_bytes]) for fd, b in got.items()}, timed_out, overflow


@dataclass(frozen=True)
class Sandbox:
    """Runs `argv` (a Python command: `python -I ...`) in a fresh sandbox per call; thread-safe.

    Args:
        backend: one of `BACKENDS` (`pick_backend` chose it).
        limits: the per-run limits.
        base_dir: where run directories are made (each is removed after its run).
    """

    backend: str
    limits: Limits = Limits()
    base_dir: str | None = None

    def python(self) -> str:
        """The interpreter the program runs on (`interpreter()`)."""
        return interpreter()

    def run(self, args: list[str], files: dict[str, str], stdin: str = "", slot: int = 0) -> RunResult:
        """Run `python <args>` in a new empty directory holding `files` (name -> text) with `stdin` as input.

        An argument equal to `REPORT_FD` becomes the number of the report pipe's write end, the one descriptor
        the program inherits besides stdin/stdout/stderr (its bytes come back as `RunResult.report`). `slot`
        picks the host uid when the service runs as root (one per concurrent run).
        """
        uid = BASE_UID + slot if os.geteuid() == 0 else None
        workdir = tempfile.mkdtemp(prefix="gtpo-code-", dir=self.base_dir)
        try:
            for name, text in files.items():
                Path(workdir, name).write_text(text)
            Path(workdir, ".stdin").write_text(stdin)
            if uid is not None:
                for p in (workdir, *(str(Path(workdir, n)) for n in (*files, ".stdin"))):
                    os.chown(p, uid, uid)
            os.chmod(workdir, 0o700)
            return self._run_in(workdir, args, uid)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run_in(self, workdir: str, args: list[str], uid: int | None) -> RunResult:
        report_r, report_w = os.pipe()
        args = [str(report_w) if a == REPORT_FD else a for a in args]
        argv, seen = command(self.backend, workdir, [self.python(), *args], self.limits, uid)
        t0 = time.monotonic()
        try:
            with open(Path(workdir, ".stdin"), "rb") as stdin:
                # pass_fds keeps the report pipe's number; the program is told it in its argv
                proc = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir,
                    env=_env(seen),
                    start_new_session=True,
                    pass_fds=(report_w,),
                )
        finally:
            os.close(report_w)
        assert proc.stdout is not None and proc.stderr is not None
        fds = proc.stdout.fileno(), proc.stderr.fileno()
        try:
            out, timed_out, overflow = _pump(proc, report_r, self.limits, t0)
        finally:
            _kill_tree(proc)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            os.close(report_r)
        return RunResult(proc.returncode, out[fds[0]], out[fds[1]], out[report_r], timed_out, overflow,
                         time.monotonic() - t0)  # fmt: skip
