"""Experiment tracking: the soup's trace and scores and a real Tune run's trials, written to
TensorBoard event files (read back by parsing their TFRecord frames) and to an MLflow file store
(read back with MLflow's own client); the tracking section never changes a content key."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.tracking import log_soup

pytest.importorskip("mlflow")

RUN_ID = "20260101T000000Z-abcdef12"


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def scalars(event_files: list[bytes]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalar summaries in TensorBoard event files (TFRecord
    frames: length, its CRC, an Event proto, its CRC; both CRCs checked)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for data in event_files:
        i = 0
        while i < len(data):
            header = data[i:i + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[i + 8:i + 12])[0] == _masked_crc(header)
            body = data[i + 12:i + 12 + n]
            assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == _masked_crc(body)
            i += 16 + n
            event = Event.FromString(body)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def event_files(uri: str) -> list[bytes]:
    """The event files directly in folder ``uri`` (local or s3://)."""
    return [storage.read_bytes(storage.join(uri, name)) for name in storage.listdir(uri)
            if name.startswith("events.out.tfevents.")]


def mlflow_runs(store: str, experiment: str) -> list:
    """The runs of an experiment in an MLflow store, read back with MLflow's client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def soup_report(cfg) -> dict:
    entry = {"ood": {}, "ingredients": [], "beta": []}
    return {"run_id": RUN_ID, "soup_key": "k" * 32, "config": cfg.model_dump(mode="json"),
            "search_trace": [[1, 0.5], [4, 0.625], [9, 0.75]],
            "methods": {"zero_shot": {**entry, "val": 0.25, "id_test": 0.3, "ood_avg": 0.2},
                        "uniform": {**entry, "val": 0.6, "id_test": 0.55, "ood_avg": None},
                        "mmms": {**entry, "val": 0.75, "id_test": 0.7, "ood_avg": 0.5}}}


EXPECTED_SCORES = {"zero_shot/val": 0.25, "zero_shot/id_test": 0.3, "zero_shot/ood_avg": 0.2,
                   "uniform/val": 0.6, "uniform/id_test": 0.55, "mmms/val": 0.75, "mmms/id_test": 0.7,
                   "mmms/ood_avg": 0.5}


def test_the_soup_run_goes_to_tensorboard_under_output_uri_and_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, [f"output_uri={tmp_path / 'out'}", f"tracking.mlflow_uri={store}",
                             "tracking.mlflow_experiment=soups"])
    lines = []
    log_soup(cfg, soup_report(cfg), log=lines.append)

    tb = scalars(event_files(str(tmp_path / "out" / "tracking" / "tensorboard" / "soup" / RUN_ID)))
    assert tb.pop("search/best_val") == [(1, 0.5), (4, 0.625), (9, 0.75)]
    assert {tag: pytest.approx(v[0][1]) for tag, v in tb.items()} == EXPECTED_SCORES

    runs = mlflow_runs(store, "soups")
    assert [r.info.run_name for r in runs] == [RUN_ID]
    run = runs[0]
    assert run.data.tags["frankensoup.run_id"] == RUN_ID and run.data.tags["frankensoup.soup_key"] == "k" * 32
    assert run.data.params["soup.granularity"] == "2" and run.data.params["soup.phase2.enabled"] == "True"
    assert {k: pytest.approx(v) for k, v in run.data.metrics.items() if k != "search/best_val"} == EXPECTED_SCORES
    history = MlflowClient(store).get_metric_history(run.info.run_id, "search/best_val")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (4, 0.625), (9, 0.75)]
    board = tmp_path / "out" / "tracking" / "tensorboard" / "soup" / RUN_ID
    assert lines == [f"soup: tracked run {RUN_ID} in {board}, MLflow {store} (experiment 'soups', run {run.info.run_id})"]

    # a run already logged is not logged twice
    log_soup(cfg, soup_report(cfg), log=lines.append)
    assert len(mlflow_runs(store, "soups")) == 1
    assert len(event_files(str(tmp_path / "out" / "tracking" / "tensorboard" / "soup" / RUN_ID))) == 1
    assert "already there" in lines[-1]


def test_soup_event_files_reach_an_s3_output_uri(s3_bucket, tmp_path):
    cfg = load_config(None, [f"output_uri={s3_bucket}/tracked", f"tracking.mlflow_uri={tmp_path / 'mlruns'}"])
    log_soup(cfg, soup_report(cfg), log=lambda _: None)
    tb = scalars(event_files(f"{s3_bucket}/tracked/tracking/tensorboard/soup/{RUN_ID}"))
    assert tb["search/best_val"] == [(1, 0.5), (4, 0.625), (9, 0.75)]
    # a path is a file store at its absolute place
    assert mlflow_runs((tmp_path / "mlruns").as_uri(), "frankensoup")[0].info.run_name == RUN_ID


def test_an_unreachable_tracking_store_is_a_warning_after_publishing(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    cfg = load_config(None, [f"output_uri={tmp_path / 'out'}", "tracking.tensorboard=false",
                             f"tracking.mlflow_uri={(blocker / 'mlruns').as_uri()}"])
    log_soup(cfg, soup_report(cfg), log=print)
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"frankensoup: warning: soup run {RUN_ID} not tracked:")


def test_tune_callbacks_follow_the_tracking_section(tmp_path):
    from pipeline.finetune.callbacks import TrialMLflow, TrialTensorBoard, tune_callbacks

    todo = [{"trial": 0, "id": "ft-000", "key": "a" * 32, "hparams": {"lr": 0.1}}]
    cfg = load_config(None, [f"output_uri={tmp_path / 'out'}"])
    (tb,) = tune_callbacks(cfg, todo, "sweep-x")
    assert isinstance(tb, TrialTensorBoard) and tb.root == str(tmp_path / "out" / "tracking" / "tensorboard" / "finetune")

    cfg = load_config(None, [f"output_uri={tmp_path / 'out'}", f"tracking.tensorboard_uri={tmp_path / 'tb'}",
                             "tracking.mlflow_uri=mlruns", "tracking.mlflow_experiment=sweeps"])
    tb, ml = tune_callbacks(cfg, todo, "sweep-x")
    assert tb.root == str(tmp_path / "tb" / "finetune")
    assert isinstance(ml, TrialMLflow) and ml.experiment_name == "sweeps"
    assert ml.tracking_uri == (Path.cwd() / "mlruns").as_uri()  # a relative path, made absolute
    assert ml.tags["frankensoup.sweep"] == "sweep-x"

    assert tune_callbacks(load_config(None, ["tracking.tensorboard=false"]), todo, "sweep-x") == []


def test_a_tune_run_reports_each_trial_to_tensorboard_and_mlflow(tmp_path, ray_local):
    from mlflow.tracking import MlflowClient
    from ray import tune

    from pipeline.finetune.callbacks import tune_callbacks

    store = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, [f"output_uri={tmp_path / 'out'}", f"tracking.mlflow_uri={store}"])
    todo = [{"trial": t, "id": f"ft-{t:03d}", "key": f"{t}" * 32, "hparams": {"lr": 0.1 * (t + 1)}} for t in (0, 1)]

    def trainable(config):
        for epoch in (1, 2):
            tune.report({"val_acc": 0.5 + 0.125 * epoch + config["trial"] / 8, "epoch": epoch})

    tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search([0, 1])},
                       run_config=tune.RunConfig(name="sweep-test", storage_path=str(tmp_path / "tune"), verbose=0,
                                                 callbacks=tune_callbacks(cfg, todo, "sweep-test")))
    assert not any(r.error for r in tuner.fit())

    root = tmp_path / "out" / "tracking" / "tensorboard" / "finetune"
    assert sorted(p.name for p in root.iterdir()) == ["ft-000-00000000", "ft-001-11111111"]
    for t in (0, 1):
        tb = scalars(event_files(str(root / f"ft-{t:03d}-{t}{t}{t}{t}{t}{t}{t}{t}")))
        assert tb["ray/tune/val_acc"] == [(1, 0.625 + t / 8), (2, 0.75 + t / 8)]

    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in mlflow_runs(store, "frankensoup")}
    assert sorted(runs) == ["ft-000", "ft-001"]
    for t in (0, 1):
        run = runs[f"ft-{t:03d}"]
        assert run.info.status == "FINISHED" and run.data.tags["frankensoup.key"] == f"{t}" * 32
        assert float(run.data.params["lr"]) == pytest.approx(0.1 * (t + 1))
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted((m.step, m.value) for m in history) == [(1, 0.625 + t / 8), (2, 0.75 + t / 8)]


def test_tracking_never_changes_a_content_key(tmp_path):
    from pipeline.keys import result_settings

    plain = load_config(None, [])
    tracked = load_config(None, [f"tracking.mlflow_uri={tmp_path}", "tracking.tensorboard=false",
                                 "tracking.tensorboard_uri=s3://b/tb", "tracking.mlflow_experiment=x",
                                 "console.status_every_s=2"])
    assert result_settings(tracked) == result_settings(plain)
    assert "tracking" not in result_settings(plain) and "console" not in result_settings(plain)
    assert result_settings(tracked.tracking) == {} and result_settings(tracked.console) == {}
