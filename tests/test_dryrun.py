"""`frankensoup run --dry-run` catches unreachable URIs and missing resources before any work."""
from conftest import tiny_config


def _run(cfg):
    from pipeline.dryrun import dry_run

    lines = []
    return dry_run(cfg, log=lines.append), "\n".join(lines)


def test_dry_run_ready_prints_the_plan(prepared_demo, ray_local):
    ok, out = _run(prepared_demo)
    assert ok, out
    assert "evaluations (upper bounds)" in out and "memory per evaluator" in out
    assert "prepare   last finished" in out


def test_dry_run_catches_unreachable_output_uri(s3_bucket, ray_local):
    cfg = tiny_config("s3://no-such-bucket-frankensoup/run")
    ok, out = _run(cfg)
    assert not ok
    assert "FAIL  output_uri s3://no-such-bucket-frankensoup/run is not writable" in out


def test_dry_run_catches_a_missing_split(tmp_path, ray_local):
    cfg = tiny_config(str(tmp_path / "out"), "data.source=shards",
                      f"data.splits={{train: {{uri: {tmp_path}/nope, role: train}}}}")
    ok, out = _run(cfg)
    assert not ok and f"split train (train) at {tmp_path}/nope" in out


def test_dry_run_catches_resources_the_cluster_lacks(prepared_demo, ray_local):
    cfg = tiny_config(prepared_demo.output_uri, "soup.evaluator_resources.gpu=1")
    ok, out = _run(cfg)
    assert not ok and "soup evaluator (x1) asks for 1 CPU, 1 GPU" in out
    ok, out = _run(tiny_config(prepared_demo.output_uri, "soup.evaluator_resources.gpu=1", "ray.autoscaling=true"))
    assert ok and "the autoscaler must add one" in out
