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
    assert "plan: S=1 val shards of whole batches per evaluation x E=" in out and "phase 1 expects about" in out
    assert "working set" in out and "in uint8" in out

    sharded = tiny_config(prepared_demo.output_uri, "soup.val_shards=2", "evaluate.working_set_gb=0.5")
    ok, out = _run(sharded)
    assert ok and "plan: S=2 val shards" in out and "evaluate.working_set_gb=0.5" in out, out
    ok, out = _run(tiny_config(prepared_demo.output_uri, "evaluate.working_set_gb=1e-9"))
    assert not ok
    [line] = [x for x in out.splitlines() if "FAIL" in x]
    assert "evaluate.working_set_gb=1e-09 is smaller than one ingredient row" in line


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
    assert not ok and "soup evaluator (x1 at once) asks for 1 CPU, 1 GPU" in out
    ok, out = _run(tiny_config(prepared_demo.output_uri, "soup.evaluator_resources.gpu=1", "ray.autoscaling=true",
                               "storage.shared=true"))
    assert ok and "the autoscaler must add one" in out


def test_with_an_autoscaler_a_local_output_uri_is_refused_and_workers_are_planned(prepared_demo, ray_local,
                                                                                   tmp_path):
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text("available_node_types:\n"
                            "  head: {resources: {CPU: 0}}\n"
                            "  cpu_worker: {min_workers: 0, max_workers: 4, resources: {CPU: 4}}\n"
                            "  gpu_worker: {min_workers: 0, max_workers: 2, resources: {CPU: 8, GPU: 1}}\n")
    settings = ("ray.autoscaling=true", f"ray.cluster_yaml={cluster_yaml}", "finetune.max_concurrent=6",
                "finetune.resources.gpu=1", "evaluate.num_actors=8")
    ok, out = _run(tiny_config(prepared_demo.output_uri, *settings))
    assert not ok and "is a local path, which the cluster's other nodes (nodes the autoscaler adds) cannot see" in out
    ok, out = _run(tiny_config(prepared_demo.output_uri, *settings, "storage.shared=true"))
    assert ok, out
    assert "finetune trials: up to 6 x gpu_worker (6 at once, 1 per node); its max_workers is 2" in out
    assert "evaluate actors: up to 2 x cpu_worker (8 at once, 4 per node)" in out
    assert "soup evaluators: up to 1 x cpu_worker (1 at once, 4 per node)" in out
