"""The in-sandbox test harness (run as `python -I -c <this file> <report fd>` in the run's directory; stdlib only).

It runs first, before any untrusted byte: it reads the run's nonce from stdin, the spec from `spec.json`, deletes
both files and detaches stdin, then runs the program and the tests, and writes one JSON report carrying the nonce
to the report descriptor. The parent only believes a report with its nonce (docs/code_rl.md, "faking a pass"):
`sys.exit(0)` / `os._exit(0)` / a crash / a killed harness leave no report; printing a marker goes to stdout, not
the report pipe; a value whose `__eq__` always says yes is refused (a function under test must return plain data);
patched builtins do not reach the tests (they run with a private copy of the original builtins).
Stdin/stdout cases run the program once per case in a child process; the parent compares the outputs itself, so
they cannot be faked from inside at all.
"""

import builtins
import json
import os
import signal
import subprocess
import sys
import types

RUN_PROGRAM = "__file__ = 'program.py'; exec(compile(open('program.py').read(), 'program.py', 'exec'))"
"""How a stdin case runs the program: by a relative path, which the unshare backend's hidden directory needs."""
PLAIN = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset, range)


class _UnitTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _UnitTimeout


def _plain(value, depth=0):
    """Only built-in data (exact types, no subclasses) may come out of a function under test."""
    if type(value) not in PLAIN or depth > 50:
        raise TypeError(f"returned a {type(value).__name__}, not plain data")
    if type(value) in (list, tuple, set, frozenset):
        for v in value:
            _plain(v, depth + 1)
    elif type(value) is dict:
        for k, v in value.items():
            _plain(k, depth + 1)
            _plain(v, depth + 1)
    return value


def _guard(fn):
    def guarded(*args, **kwargs):
        return _plain(fn(*args, **kwargs))

    return guarded


def _run_unit(code, env, seconds):
    """One test: None when it passed, else why not (at most 200 characters)."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        exec(code, env)
        return None
    except _UnitTimeout:
        return f"timed out after {seconds:g} s"
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: a test that exits did not pass
        return f"{type(e).__name__}: {e}"[:200]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _functions(spec, unit_s):
    pristine = dict(vars(builtins))
    program_env = {"__name__": "__main__", "__builtins__": builtins}
    signal.signal(signal.SIGALRM, _alarm)
    loaded = _run_unit(compile(spec["program"], "program.py", "exec"), program_env, unit_s)
    if loaded is not None:
        return {"passed": [False] * spec["units"], "why": f"the program failed: {loaded}"}
    exposed = {k: _guard(v) if isinstance(v, types.FunctionType) else v for k, v in program_env.items()}
    results = []
    for code in spec["tests"]:
        env = {**exposed, "__builtins__": dict(pristine), "__name__": "__test__"}
        results.append(_run_unit(code, env, unit_s))
    why = next((r for r in results if r is not None), None)
    return {"passed": [r is None for r in results], "why": why}


def _stdio(spec, unit_s, out_cap):
    outputs, why = [], None
    for i, text in enumerate(spec["inputs"]):
        with open(f"in.{i}", "w") as f:
            f.write(text)
        with open(f"in.{i}") as stdin, open(f"out.{i}", "w") as out:
            child = subprocess.Popen([sys.executable, "-I", "-c", RUN_PROGRAM], stdin=stdin, stdout=out,
                                     stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            try:
                child.wait(unit_s)
            except subprocess.TimeoutExpired:
                why = why or f"case {i} timed out after {unit_s:g} s"
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
            child.wait()
        with open(f"out.{i}", "rb") as f:
            outputs.append(f.read(out_cap).decode("utf-8", "replace"))
    return {"outputs": outputs, "why": why}


def main():
    report = int(sys.argv[1])
    os.write(report, b"S")  # started: without this byte the parent knows the sandbox itself failed, not the program
    nonce = sys.stdin.read().strip()
    with open("spec.json") as f:
        spec = json.load(f)
    for name in ("spec.json", ".stdin"):
        os.unlink(name)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    fd = os.dup(report)
    os.close(report)
    os.set_inheritable(fd, False)
    if spec["mode"] == "stdio":
        with open("program.py", "w") as f:
            f.write(spec["program"])
        result = _stdio(spec, spec["unit_s"], spec["out_cap"])
    else:
        result = _functions(spec, spec["unit_s"])
    os.write(fd, json.dumps({"nonce": nonce, **result}).encode())
    os._exit(0)  # no atexit hook or finaliser of the program's runs after the report


if __name__ == "__main__":
    main()
