"""The main job: prepare -> finetune -> evaluate -> soup. A stage finished under the same
settings (its `_DONE.json` key, which chains everything upstream) is skipped; one whose inputs
or settings changed is redone, and so is everything after it."""
from __future__ import annotations

import time
from collections.abc import Callable

from . import layout
from .config import Config

Log = Callable[[str], None]


def _stage_runner(stage: str):
    """The function that runs a stage: (cfg, force=..., ...) -> its result."""
    if stage == "prepare":
        from .prepare import run_prepare
        return run_prepare
    if stage == "finetune":
        from .finetune.sweep import run_finetune
        return run_finetune
    if stage == "evaluate":
        from .evaluate.stage import run_evaluate
        return run_evaluate
    from .soup.stage import run_soup
    return run_soup


def plan(cfg: Config) -> list[tuple[str, str]]:
    """(stage, what happens) in order: "skip" (done under these settings), "run" (not done, or
    done under other settings; a crashed stage resumes), or "redo" (its marker matches but a
    stage before it runs again, so its inputs will change)."""
    out, upstream_runs = [], False
    for stage in layout.STAGES:
        marked = layout.stage_done(cfg, stage) is not None
        action = ("redo" if upstream_runs else "skip") if marked else "run"
        upstream_runs = upstream_runs or action != "skip"
        out.append((stage, action))
    return out


def run_all(cfg: Config, force: bool = False, log: Log = print) -> dict:
    """Run every stage not yet done under these settings (all of them with ``force``); returns
    the soup's report (report.json's content) and prints each stage's wall time and the table."""
    from .raycluster import init_ray

    init_ray(cfg)
    seconds: dict[str, float] = {}
    report: dict = {}
    for stage, action in plan(cfg):
        t0 = time.time()
        log(f"== {stage}" + (": done under these settings" if action == "skip" and not force else ""))
        # a stage checks its own marker (skip) and resumes its own partial work (run); only a
        # stage whose inputs are about to change is told to ignore its marker
        runner = _stage_runner(stage)
        options = {"show_table": False} if stage == "soup" else {}  # the table comes last, below
        result = runner(cfg, force=force or action == "redo", log=log, **options)
        seconds[stage] = time.time() - t0
        log(f"== {stage}: {seconds[stage]:.1f}s")
        if stage == "soup":
            report = result
    log("stage wall times: " + ", ".join(f"{s} {t:.1f}s" for s, t in seconds.items())
        + f" (total {sum(seconds.values()):.1f}s)")
    from .soup.report import markdown_table

    log(markdown_table(report))
    return report


def dry_run(cfg: Config, log: Log = print) -> bool:
    """`frankensoup run --dry-run`: see pipeline/dryrun.py (config, URIs, cluster, plan)."""
    from .dryrun import dry_run as check

    return check(cfg, log)
