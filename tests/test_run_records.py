"""What a `run` records about itself: run.json names the command's run id (the `run` label of its
dashboard metrics; tests/test_cluster.py checks the metrics carry it), and report.json,
run.json and the log lines keep credentials written inside a URI out of sight."""
from __future__ import annotations

import json

import pytest

from conftest import EVALUATED_OVERRIDES, clone_output
from pipeline import layout, storage
from pipeline.soup import publish

SECRET = "s3cr3t-in-uri"


@pytest.fixture(scope="module")
def recorded_run(evaluated_demo, s3_bucket, tmp_path_factory):
    """A run (the soup left to do) under a run id of its own, its TensorBoard files sent to S3
    through a URI that carries a secret."""
    import os

    from pipeline.metrics import RUN_ENV, new_run
    from pipeline.run import run_all

    os.environ.pop(RUN_ENV, None)
    run = new_run()
    tb = f"s3://testing:{SECRET}@{s3_bucket[len('s3://'):]}/records-tb"
    cfg = clone_output(evaluated_demo, tmp_path_factory.mktemp("records") / "out", *EVALUATED_OVERRIDES,
                       f"tracking.tensorboard_uri={tb}")
    lines: list[str] = []
    try:
        report = run_all(cfg, log=lines.append)
    finally:
        os.environ.pop(RUN_ENV, None)
    return {"cfg": cfg, "run": run, "report": report, "lines": lines}


def test_run_json_names_the_run(recorded_run):
    record = storage.read_json(layout.run_record_uri(recorded_run["cfg"]))
    assert record["run"] == recorded_run["run"] and record["run_id"] == recorded_run["report"]["run_id"]


def test_stored_config_and_logs_hide_credentials(recorded_run):
    cfg = recorded_run["cfg"]
    hidden = cfg.tracking.tensorboard_uri.replace(f"testing:{SECRET}@", "***@")
    report_text = storage.read_bytes(storage.join(publish.run_uri(cfg, recorded_run["report"]["run_id"]),
                                                  "report.json")).decode()
    run_text = storage.read_bytes(layout.run_record_uri(cfg)).decode()
    for text in (report_text, run_text, "\n".join(recorded_run["lines"])):
        assert SECRET not in text
    for text in (report_text, run_text):
        assert json.loads(text)["config"]["tracking"]["tensorboard_uri"] == hidden
    assert any(hidden in line for line in recorded_run["lines"])  # the log names where it went, hidden
    # the event files did go there: the secret reached storage, not the records
    assert storage.listdir(cfg.tracking.tensorboard_uri)
