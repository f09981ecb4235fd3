"""The PASS / FAIL / SKIP report shared by the one-call device checks (gpu_check.py, cuda_check.py)."""

from __future__ import annotations

import datetime
import json
import traceback
from collections.abc import Callable
from pathlib import Path


class Report:
    """Stages as they finish, printed and saved to OUT/NAME.json at once (a timeout keeps the finished ones)."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.data: dict = {"date": now, "stages": {}}
        self.failed = False

    def stage(self, name: str, ok: bool | None, **detail) -> None:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        self.failed |= ok is False
        self.data["stages"][name] = {"result": word, **detail}
        print(f"[{word}] {name}: {json.dumps(detail, default=str)}", flush=True)  # noqa: T201 - the report
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.name}.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def finish(run: Callable[..., Report], args) -> int:
    """Run the checks; exit status 1 on a failed stage or a crash (its traceback printed), else 0."""
    try:
        rep = run(args)
    except Exception:
        traceback.print_exc()
        return 1
    print("RESULT", "FAIL" if rep.failed else "PASS", json.dumps(rep.data.get("env", {})), flush=True)  # noqa: T201
    return 1 if rep.failed else 0
