"""Images/s of one finetuning trial inside Ray Tune vs the same loop run plainly in-process.

Both run `pipeline.finetune.trainable.run_trial` with the same config and torch thread count;
the rate is measured inside the loop over the training steps only (no start-up, no val pass,
no checkpoint), per epoch, skipping the first (warm-up). Runs alternate between the two. On a
shared machine neighbours slow random epochs down, so the headline compares each side's best
epoch (the least disturbed); the medians are printed too. The last line of stdout is
`ratio=<tune/plain>`.

    python bench/finetune_throughput.py                      # prepares a small demo in a temp dir
    python bench/finetune_throughput.py --output-uri ./frankensoup-output --epochs 6
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402

SMALL_DEMO = ["model.demo_base.steps=60"]  # a base trained in seconds: throughput, not accuracy


def prepared_config(output_uri: str | None, workdir: str):
    from pipeline import layout
    from pipeline.prepare import run_prepare

    if output_uri is None:
        cfg = load_config(None, [*SMALL_DEMO, f"output_uri={os.path.join(workdir, 'out')}"])
        run_prepare(cfg, log=lambda *_: None)
        return cfg
    cfg = load_config(None, [f"output_uri={output_uri}"])
    if not layout.read_marker(cfg, "prepare"):
        raise SystemExit(f"{output_uri}: no finished prepare stage with the demo settings")
    return cfg


def bench_config(cfg, epochs: int, threads: int) -> dict:
    from pipeline.finetune.sweep import trial_setup

    setup = {**trial_setup(cfg), "threads": threads, "inject_failure": None}
    # a middle-of-the-space trial: augmentation and mixing on, so their cost is in the loop
    return {"trial": 0, "lr": 1e-3, "weight_decay": 0.01, "epochs": epochs, "label_smoothing": 0.1,
            "randaugment_magnitude": 5, "mix_prob": 0.3, "setup": setup}


def epoch_rates(epoch_rows: list[dict]) -> list[tuple[float, float]]:
    """(images per wall second, images per CPU second of the training thread) of the training
    steps of each epoch after the first (warm-up)."""
    return [(r["train_images"] / r["train_seconds"], r["train_images"] / r["train_cpu_seconds"])
            for r in epoch_rows if r["epoch"] > 1]


def plain_rates(config: dict) -> list[tuple[float, float]]:
    from pipeline.finetune.trainable import run_trial

    rows: list[dict] = []
    run_trial(config, lambda metrics, ckpt: rows.append(metrics))
    return epoch_rates(rows)


def tune_rates(config: dict, storage_dir: str, name: str) -> list[tuple[float, float]]:
    from ray import tune

    from pipeline.finetune.trainable import train_ingredient

    tuner = tune.Tuner(tune.with_resources(train_ingredient, {"cpu": 1}), param_space=config,
                       run_config=tune.RunConfig(storage_path=storage_dir, name=name, verbose=0))
    result = tuner.fit()[0]
    if result.error is not None:
        raise result.error
    return epoch_rates(result.metrics_dataframe.to_dict("records"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-uri", help="a finished prepare output with the demo settings")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both runs")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians compared")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="frankensoup-bench-") as workdir:
        cfg = prepared_config(args.output_uri, workdir)
        config = bench_config(cfg, args.epochs, args.threads)
        ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
        try:
            plain, inside = [], []
            for i in range(args.repeats):  # alternate, so a noisy neighbour hits both alike
                plain += plain_rates(config)
                inside += tune_rates(config, os.path.join(workdir, "tune"), f"bench-{i}")
                print(f"repeat {i}: plain {fmt(plain[-args.epochs + 1:])}; in Tune {fmt(inside[-args.epochs + 1:])}")
        finally:
            ray.shutdown()
    wall_p, cpu_p = zip(*plain)
    wall_t, cpu_t = zip(*inside)
    print(f"threads={args.threads}, {len(plain)} epochs each side")
    print(f"plain images/s: best {max(wall_p):.1f}, median {statistics.median(wall_p):.1f}; "
          f"per CPU second: median {statistics.median(cpu_p):.1f}")
    print(f"tune  images/s: best {max(wall_t):.1f}, median {statistics.median(wall_t):.1f}; "
          f"per CPU second: median {statistics.median(cpu_t):.1f}")
    # CPU-second rates show the loop's own cost, whatever the neighbours take of the cores
    print(f"cpu ratio={statistics.median(cpu_t) / statistics.median(cpu_p):.3f}")
    print(f"median ratio={statistics.median(wall_t) / statistics.median(wall_p):.3f}")
    print(f"ratio={max(wall_t) / max(wall_p):.3f}")


def fmt(rates: list[tuple[float, float]]) -> str:
    return " ".join(f"{wall:.0f}" for wall, _ in rates) + " images/s"


if __name__ == "__main__":
    main()
