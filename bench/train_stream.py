"""Images/s of a finetuning epoch with the train split streamed vs kept in memory.

Both run `pipeline.finetune.trainable.run_trial` with the same trial; only `finetune.loader`
differs. The rate counts the whole epoch loop: training steps plus waiting for batches
(`train_seconds + load_seconds`), so the stream's reads and decodes are in it; the memory
side decoded its split once before the first epoch, which is not counted. The demo's train
split is replicated (`--replicate`) so an epoch lasts seconds, not the fraction of a second a
stream needs to start its workers. Epochs after the
first, runs alternating between the two; the headline compares each side's best epoch (the
least disturbed by neighbours), the medians are printed too. The last line of stdout is
`ratio=<stream/memory>`.

    python bench/train_stream.py                      # prepares a small demo in a temp dir
    python bench/train_stream.py --workers 1 --replicate 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from finetune_throughput import bench_config, prepared_config  # noqa: E402


def replicated_train(train_uri: str, times: int, dest: str) -> str:
    """The train split written ``times`` over (shards of 512): epochs long enough that a
    stream's per-epoch start (forking workers, filling buffers) stops dominating."""
    from pipeline.data.shards import read_split, write_split

    split = read_split(train_uri)
    images, labels = split.table.column("image").to_pylist(), split.table.column("label").to_pylist()
    write_split(dest, images * times, labels * times, name="train-x", role="train",
                class_names=split.class_names, rows_per_shard=512)
    return dest


def epoch_rates(config: dict) -> list[float]:
    from pipeline.finetune.trainable import run_trial

    rows: list[dict] = []
    run_trial(config, lambda metrics, ckpt: rows.append(metrics))
    return [r["train_images"] / (r["train_seconds"] + r["load_seconds"]) for r in rows if r["epoch"] > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-uri", help="a finished prepare output with the demo settings")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training loop")
    parser.add_argument("--workers", type=int, default=1, help="finetune.loader_workers of the stream")
    parser.add_argument("--buffer", type=int, default=4096, help="finetune.shuffle_buffer")
    parser.add_argument("--replicate", type=int, default=8, help="train on the demo train split N times over")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="frankensoup-bench-") as workdir:
        cfg = prepared_config(args.output_uri, workdir)
        config = bench_config(cfg, args.epochs, args.threads)
        config["setup"]["train_uri"] = replicated_train(config["setup"]["train_uri"], args.replicate,
                                                        os.path.join(workdir, "train-x"))
        rates: dict[str, list[float]] = {"memory": [], "stream": []}
        for i in range(args.repeats):  # alternate, so a noisy neighbour hits both alike
            for loader in rates:
                config["setup"].update(loader=loader, loader_workers=args.workers, shuffle_buffer=args.buffer)
                rates[loader] += epoch_rates(config)
            print(f"repeat {i}: " + "; ".join(f"{k} {' '.join(f'{r:.0f}' for r in v[-args.epochs + 1:])} images/s"
                                                for k, v in rates.items()))
    for loader, r in rates.items():
        print(f"{loader:<6} images/s: best {max(r):.1f}, median {statistics.median(r):.1f}")
    print(f"threads={args.threads} workers={args.workers} buffer={args.buffer} "
          f"train images={args.replicate}x the demo's, "
          f"{len(rates['memory'])} epochs each side")
    print(f"median ratio={statistics.median(rates['stream']) / statistics.median(rates['memory']):.3f}")
    print(f"ratio={max(rates['stream']) / max(rates['memory']):.3f}")


if __name__ == "__main__":
    main()
