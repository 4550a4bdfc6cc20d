"""The adversarial suite's ledger: per class of attack, how many were tried, how many broke a contract, and how long
the daemon took to answer a normal request again. The session's `hardening` fixture (tests/conftest.py) merges it into
bench/results/hardening.json at the end of the run."""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "hardening.json"


@dataclass
class AttackClass:
    """One class of attack: what it is, the test that runs it, and what came of it."""

    name: str
    threat: str
    test: str
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)  # attack over -> a normal request answered again
    seconds: float = 0.0

    @contextlib.contextmanager
    def trial(self, what: str = "") -> Iterator[None]:
        """One attempt: counted, and a failure if what it runs raises (the exception goes on)."""
        self.attempts += 1
        try:
            yield
        except BaseException as exc:
            self.failed(f"{what}: {type(exc).__name__}: {exc}")
            raise

    def failed(self, what: str) -> None:
        if len(self.failures) < 20:  # the first few say enough
            self.failures.append(what[:500])

    def summary(self) -> dict[str, Any]:
        worst = max(self.recovery_s, default=None)
        return {"threat": self.threat, "test": self.test, "attempts": self.attempts,
                "failures": len(self.failures), "first_failures": self.failures[:5],
                "recovery_s_max": None if worst is None else round(worst, 3),
                "recovery_s_median": None if not self.recovery_s else round(sorted(self.recovery_s)[
                    len(self.recovery_s) // 2], 3),
                "seconds": round(self.seconds, 1)}


class Ledger:
    """Every attack class run in this session, written out once at the end."""

    def __init__(self) -> None:
        self.classes: dict[str, AttackClass] = {}

    def attack(self, name: str, threat: str, test: str) -> AttackClass:
        return self.classes.setdefault(name, AttackClass(name, threat, test))

    def write(self, path: Path = RESULTS) -> None:
        """Merge this session's classes into the results file: a run of a few tests updates only theirs."""
        if not self.classes:
            return
        try:
            classes = json.loads(path.read_text())["classes"]
        except (OSError, ValueError, KeyError):
            classes = {}
        classes.update({name: c.summary() for name, c in self.classes.items()})
        body = {"machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
                "classes": dict(sorted(classes.items())),
                "total": {"classes": len(classes), "attempts": sum(c["attempts"] for c in classes.values()),
                          "failures": sum(c["failures"] for c in classes.values())}}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body, indent=2) + "\n")
