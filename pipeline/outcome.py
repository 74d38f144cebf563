"""What a stage did, for its one summary line and for ``output_uri/run.json``: how many units
of work it reused (their content key matched) and how many it computed."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Outcome:
    stage: str
    reused: int = 0
    computed: int = 0
    seconds: float = 0.0
    unit: str = "units"  # what is counted: "trials", "scores", "mixtures", ...
    result: object = None  # the stage's own return value (not written to run.json)

    @property
    def status(self) -> str:
        """"reused": nothing computed; "done": everything computed; "partial": some of each."""
        if self.computed == 0:
            return "reused"
        return "done" if self.reused == 0 else "partial"

    def line(self) -> str:
        return f"{self.stage}: {self.reused} {self.unit} reused, {self.computed} computed ({self.seconds:.1f}s)"

    def record(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("stage", "result")}
        return {"status": self.status, **out, "seconds": round(self.seconds, 1)}
