"""The stages in order, one line each: the command, the function that runs it and what it does.
run.py runs them in this order, cli.py makes a subcommand of each (its help is ``help``),
layout.py marks each done under its name. A stage's function is imported when it runs, so
reading this table costs nothing: ``run(cfg, force=..., log=...)``."""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple


class Stage(NamedTuple):
    runner: str  # "module:function"
    help: str


STAGES: dict[str, Stage] = {
    "prepare": Stage("pipeline.prepare:run_prepare", "build the demo shards and the demo base model"),
    "finetune": Stage("pipeline.finetune.sweep:run_finetune", "run the Ray Tune sweep and write the ingredient registry"),
    "evaluate": Stage("pipeline.evaluate.stage:run_evaluate",
                      "score every ingredient on val, id_test and ood sets (Ray Data)"),
    "soup": Stage("pipeline.soup.stage:run_soup", "baselines + manifold mixing soup; publish the fused model"),
}


def runner(stage: str) -> Callable:
    """The function that runs ``stage``: (cfg, force=..., log=...) -> its result."""
    module, _, name = STAGES[stage].runner.partition(":")
    return getattr(importlib.import_module(module), name)
