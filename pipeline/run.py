"""The main job: prepare -> finetune -> evaluate -> soup. Every stage runs, and each reuses
every unit of work whose content key (pipeline/keys.py) is unchanged: a run after a small
change redoes exactly what depends on it. What each stage reused and computed goes to
``output_uri/run.json``."""
from __future__ import annotations

import time
from collections.abc import Callable

from . import layout, storage
from .config import Config, redacted
from .metrics import current_run
from .stages import STAGES, runner

Log = Callable[[str], None]


def stage_record(cfg: Config, stage: str, seconds: float) -> dict:
    """run.json's entry of a stage, from the marker it just wrote: reused/done/partial."""
    marker = layout.read_marker(cfg, stage) or {}
    reused, computed = int(marker.get("reused", 0)), int(marker.get("computed", 0))
    status = "reused" if computed == 0 else ("done" if reused == 0 else "partial")
    record = {"status": status, "reused": reused, "computed": computed, "unit": marker.get("unit", "units"),
              "seconds": round(seconds, 1)}
    # the soup also scores its fused models: those scores are work too
    record.update({k: marker[k] for k in ("scores_reused", "scores_computed") if k in marker})
    if record.get("scores_computed") and status == "reused":
        record["status"] = "partial"
    return record


def run_all(cfg: Config, force: bool = False, log: Log = print, show_table: bool = True) -> dict:
    """Run every stage (each reusing what it can; nothing with ``force``); returns the soup's
    report (report.json's content), writes run.json and prints each stage's line and the table
    (unless ``show_table`` is False: the CLI prints it to fit the terminal)."""
    from .raycluster import init_ray

    init_ray(cfg)
    stages: dict[str, dict] = {}
    report: dict = {}
    started = time.time()
    for stage in STAGES:
        t0 = time.time()
        options = {"show_table": False} if stage == "soup" else {}  # the table comes last, below
        result = runner(stage)(cfg, force=force, log=log, **options)
        stages[stage] = stage_record(cfg, stage, time.time() - t0)
        r = stages[stage]
        log(f"== {stage}: {r['status']} ({r['reused']} {r['unit']} reused, {r['computed']} computed, {r['seconds']}s)")
        if stage == "soup":
            report = result
    storage.write_json(layout.run_record_uri(cfg), {
        "stages": stages, "run": current_run(), "run_id": report.get("run_id"), "config": redacted(cfg),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - started, 1)})
    if show_table:
        from .report.results import markdown_table

        log(markdown_table(report))
    return report


def dry_run(cfg: Config, log: Log = print) -> bool:
    """`frankensoup run --dry-run`: see pipeline/dryrun.py (config, URIs, cluster, plan)."""
    from .dryrun import dry_run as check

    return check(cfg, log)
