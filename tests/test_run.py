"""The main job: stages run in order, each reusing the work whose inputs are unchanged (see
test_incremental.py for each kind of change), writing run.json, and the run ends with the
report (returned and printed)."""
from __future__ import annotations

import pytest

from conftest import EVALUATED_OVERRIDES, clone_output, tiny_config
from pipeline import layout, storage
from pipeline.run import run_all


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
    record = storage.read_json(layout.run_record_uri(cfg))
    assert set(record["stages"]) == set(layout.STAGES) and record["run_id"] == report["run_id"]
    for stage in ("prepare", "finetune", "evaluate"):  # done by the shared fixture already
        assert record["stages"][stage]["status"] == "reused" and record["stages"][stage]["computed"] == 0
        assert any(line.startswith(f"== {stage}: reused") for line in lines)
    assert record["stages"]["soup"]["computed"] > 0
    assert lines[-1].splitlines()[-1].startswith("| mmms |")  # the table comes last
    assert report["run_id"] == storage.read_pointer(layout.latest_pointer(cfg))
    assert set(report["methods"]) >= {"zero_shot", "best_individual", "uniform_soup", "greedy_soup", "mmms"}


def test_a_second_run_reuses_everything(finished):
    cfg, report, _ = finished
    before = run_dirs(cfg)
    lines: list[str] = []
    assert run_all(cfg, log=lines.append) == report
    assert run_dirs(cfg) == before
    assert all(any(line.startswith(f"== {s}: reused") for line in lines) for s in layout.STAGES)


def test_settings_that_never_change_a_result_redo_nothing(finished):
    cfg, report, _ = finished
    # (evaluate.batch_size is neutral for the stage's scores but keys the soup's search memo: a
    # batch's logits may depend on how many images share it)
    faster = tiny_config(cfg.output_uri, *EVALUATED_OVERRIDES, "soup.num_evaluators=2", "evaluate.num_actors=2",
                         "finetune.max_concurrent=1", "soup.val_shards=3")
    assert run_all(faster, log=lambda *_: None) == report
    record = storage.read_json(layout.run_record_uri(faster))["stages"]
    assert all(r["computed"] == 0 for r in record.values())


def test_the_cli_runs_the_main_job(finished, capsys):
    from conftest import TINY_OVERRIDES
    from pipeline.cli import main

    cfg, report, _ = finished
    args = [a for o in [*TINY_OVERRIDES, *EVALUATED_OVERRIDES, f"output_uri={cfg.output_uri}"] for a in ("--set", o)]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "== soup: reused" in out and "| mmms |" in out
    assert run_dirs(cfg) == [report["run_id"]]
