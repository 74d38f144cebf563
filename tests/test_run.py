"""The main job: stages run in order, finished ones are skipped, a changed one is redone with
everything after it, and the run ends with the report (returned and printed)."""
from __future__ import annotations

import pytest

from conftest import EVALUATED_OVERRIDES, clone_output, tiny_config
from pipeline import layout, storage
from pipeline.run import plan, run_all


def run_dirs(cfg) -> list[str]:
    return [n for n in storage.listdir(layout.soup_root(cfg)) if n[:1].isdigit()]


@pytest.fixture(scope="module")
def finished(evaluated_demo, tmp_path_factory):
    """An output where run_all had only the soup left to do, and its log."""
    cfg = clone_output(evaluated_demo, tmp_path_factory.mktemp("run") / "out", *EVALUATED_OVERRIDES)
    lines: list[str] = []
    report = run_all(cfg, log=lines.append)
    return cfg, report, lines


def test_run_all_does_what_is_left_and_returns_the_report(finished):
    cfg, report, lines = finished
    assert [s for s in layout.STAGES if layout.stage_done(cfg, s)] == list(layout.STAGES)
    for stage in ("prepare", "finetune", "evaluate"):
        assert f"== {stage}: done under these settings" in lines
    assert "== soup" in lines
    assert any(line.startswith("stage wall times: prepare") for line in lines)
    assert lines[-1].splitlines()[-1].startswith("| mmms |")  # the table comes last
    assert report["run_id"] == storage.read_pointer(layout.latest_pointer(cfg))
    assert set(report["methods"]) >= {"zero_shot", "best_individual", "uniform_soup", "greedy_soup", "mmms"}


def test_a_second_run_skips_everything(finished):
    cfg, report, _ = finished
    before = run_dirs(cfg)
    lines: list[str] = []
    assert run_all(cfg, log=lines.append) == report
    assert run_dirs(cfg) == before
    assert all(f"== {s}: done under these settings" in lines for s in layout.STAGES)


def test_a_changed_setting_redoes_its_stage_and_those_after_it(finished):
    cfg, _, _ = finished
    assert plan(cfg) == [(s, "skip") for s in layout.STAGES]
    soup_changed = tiny_config(cfg.output_uri, *EVALUATED_OVERRIDES, "soup.tau=0.99")
    assert dict(plan(soup_changed)) == {"prepare": "skip", "finetune": "skip", "evaluate": "skip", "soup": "run"}
    finetune_changed = tiny_config(cfg.output_uri, *EVALUATED_OVERRIDES, "finetune.seed=7")
    assert dict(plan(finetune_changed)) == {"prepare": "skip", "finetune": "run", "evaluate": "run", "soup": "run"}
    # how many evaluators run the soup never changes its result: nothing to redo
    faster = tiny_config(cfg.output_uri, *EVALUATED_OVERRIDES, "soup.num_evaluators=2")
    assert plan(faster) == [(s, "skip") for s in layout.STAGES]


def test_a_redone_stage_makes_the_later_ones_redo(finished, tmp_path):
    cfg, _, _ = finished
    copy = clone_output(cfg, tmp_path / "out", *EVALUATED_OVERRIDES)
    storage.delete(storage.join(layout.stage_dir(copy, "prepare"), "_DONE.json"))
    # their markers still match their keys, but their inputs are about to be rebuilt
    assert dict(plan(copy)) == {"prepare": "run", "finetune": "redo", "evaluate": "redo", "soup": "redo"}


def test_the_cli_runs_the_main_job(finished, capsys):
    from conftest import TINY_OVERRIDES
    from pipeline.cli import main

    cfg, report, _ = finished
    args = [a for o in [*TINY_OVERRIDES, *EVALUATED_OVERRIDES, f"output_uri={cfg.output_uri}"] for a in ("--set", o)]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "stage wall times" in out and "| mmms |" in out
    assert run_dirs(cfg) == [report["run_id"]]
