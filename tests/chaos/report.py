"""What a chaos run found: the faults it injected, the audit's counts and
violations, and the table it prints (with the seed to replay it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.chaos.driver import ChaosConfig


@dataclass
class FaultRecord:
    name: str
    started: float
    ended: float = 0.0
    detail: str = ""


@dataclass
class ChaosReport:
    seed: int
    config: ChaosConfig
    faults: list[FaultRecord] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    committed: int = 0
    executions: int = 0
    submissions: int = 0
    client_retries: int = 0
    zombies_rejected: int = 0
    side_effects_refused: int = 0
    reexecutions: Counter = field(default_factory=Counter)
    #: Requests the driver had to submit again after waiting (lost messages).
    resubmitted: set = field(default_factory=set)
    #: Workers that died on their own and were restarted (a supervisor's job).
    worker_exits: int = 0
    elapsed: float = 0.0

    def summary(self) -> dict:
        """The figures a test asserts on, JSON-ready."""
        return {"seed": self.seed, "jobs": self.config.jobs, "ok": self.ok,
                "violations": self.violations,
                "faults": [f.name for f in self.faults],
                "committed": self.committed,
                "submissions": self.submissions,
                "executions": self.executions,
                "zombies_rejected": self.zombies_rejected,
                "table": self.table()}

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        cfg = self.config
        lines = [
            f"chaos run  seed={self.seed}  jobs={cfg.jobs}  "
            f"workers={cfg.workers}x{cfg.concurrency}  clients={cfg.clients}"
            f"  elapsed={self.elapsed:.1f}s",
            f"  submissions            {self.submissions:>6}  "
            f"(client retries {self.client_retries})",
            f"  committed results      {self.committed:>6}  of {cfg.jobs}",
            f"  executions (bodies)    {self.executions:>6}",
            f"  workers that exited on their own  {self.worker_exits}  "
            "(restarted, as a supervisor would)",
            f"  re-submitted by a client after a wait  "
            f"{len(self.resubmitted)}  (the broker had lost them)",
            f"  zombie commits fenced  {self.zombies_rejected:>6}  "
            f"(accepted: 0 unless listed below)",
            f"  stale side effects     {self.side_effects_refused:>6}  "
            "refused by the fenced store",
            "  fault                  at(s)   took(s)  re-executions",
        ]
        start = self.faults[0].started if self.faults else 0.0
        for n, fault in enumerate(self.faults):
            lines.append(f"  {fault.name:<20} {fault.started - start:>6.1f}  "
                         f"{fault.ended - fault.started:>7.1f}  "
                         f"{self.reexecutions.get(n, 0):>6}   "
                         f"{fault.detail}")
        if self.reexecutions.get(None):
            lines.append(f"  (no fault nearby)                        "
                         f"{self.reexecutions[None]:>6}")
        lines.append("  violations: " + ("none" if self.ok else ""))
        lines.extend(f"    - {v}" for v in self.violations)
        lines.append(f"  replay: python -m tests.chaos.driver "
                     f"--jobs {cfg.jobs} --seed {self.seed}")
        return "\n".join(lines)
