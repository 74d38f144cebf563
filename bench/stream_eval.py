"""Images/s of Ray Data streaming evaluation (`pipeline.evaluate.stream.score_models`) vs a plain
in-process loop over the same shards: read each shard, decode, transform, forward, count.

    python bench/stream_eval.py [--images 40000] [--models 1] [--num-actors 1] [--threads 1]

It writes its own data in a temp dir: the demo digits (16 px PNGs) repeated to ``--images``, in
shards of 512 rows, and the demo architecture's classifier (random init: throughput, not
accuracy). Ray starts before the clock (a cluster is up before a job runs); the streamed time
includes everything else: planning, starting the actor pool, loading the models in the actors,
reading, decoding, scoring and gathering. Both sides use the same torch thread count per
process; the streamed side runs one scoring actor with 1 CPU beside Ray's read tasks. The two
alternate ``--rounds`` times and the best of each is compared (the least disturbed run on a
shared machine); the medians are printed too. Last line of stdout: ``ratio=<streamed/plain>``.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import storage  # noqa: E402
from pipeline.config import Resources, SplitConfig  # noqa: E402
from pipeline.data.demo import DIGIT_CLASSES, load_digit_images, to_png  # noqa: E402
from pipeline.data.shards import decode_image, shard_uris, write_split  # noqa: E402

MODEL = "frankensoup-demo-vit"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def write_data(workdir: str, n_images: int, n_models: int) -> tuple[str, dict[str, str]]:
    """(split URI, {model name: checkpoint URI}): digits repeated to n_images, and classifiers."""
    import torch

    from pipeline.model import init_classifier, model_config, save_classifier

    images, labels = load_digit_images(upsample=2)
    pngs = to_png(images)
    reps = -(-n_images // len(pngs))
    split = os.path.join(workdir, "val")
    write_split(split, (pngs * reps)[:n_images], np.tile(labels, reps)[:n_images], name="val", role="val",
                class_names=DIGIT_CLASSES, rows_per_shard=512)
    preprocess = {"size": model_config(MODEL)["vision_cfg"]["image_size"], "mean": OPENAI_MEAN, "std": OPENAI_STD}
    models = {}
    for i in range(n_models):
        torch.manual_seed(i)
        models[f"m{i}"] = os.path.join(workdir, f"m{i}.safetensors")
        save_classifier(models[f"m{i}"], init_classifier(MODEL, len(DIGIT_CLASSES)), model_name=MODEL,
                        class_names=DIGIT_CLASSES, preprocess=preprocess)
    return split, models


class Clock:
    """Timestamps of scored rows: the steady rate runs from the first scored batch to the last,
    so start-up (imports, actor pool, model loading) is left out on both sides."""

    def __init__(self):
        self.start = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int | None = None) -> None:
        self.marks.append((time.perf_counter(), done))

    def steady_rate(self) -> float:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0)

    def total_rate(self) -> float:
        return self.marks[-1][1] / (self.marks[-1][0] - self.start)


def plain_loop(split: str, models: dict[str, str], batch_size: int, clock: Clock) -> dict[str, int]:
    """The same work in one process: shard by shard, decode once per batch, every model."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.model import image_transform, load_classifier

    loaded = [load_classifier(uri) for uri in models.values()]
    transform = image_transform(loaded[0][1]["preprocess"])
    correct = dict.fromkeys(models, 0)
    done = 0
    for shard in shard_uris(split):
        table = pq.read_table(io.BytesIO(storage.read_bytes(shard)))
        images = table.column("image").to_pylist()
        labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
        for s in range(0, len(images), batch_size):
            x = torch.stack([transform(decode_image(b)) for b in images[s:s + batch_size]])
            with torch.inference_mode():
                for name, (clf, _) in zip(models, loaded):
                    correct[name] += int((clf(x).argmax(1) == labels[s:s + batch_size]).sum())
            done += len(x)
            clock(done)
    return correct


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=40000, help="images in the split (default 40000)")
    p.add_argument("--models", type=int, default=1, help="models scored in the same pass (default 1)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each side (default 2)")
    args = p.parse_args(argv)

    import ray
    import torch

    from pipeline.evaluate.stream import score_models

    torch.set_num_threads(args.threads)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    rates: dict[str, dict[str, list[float]]] = {side: {"steady": [], "total": []} for side in ("plain", "streamed")}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as workdir:
        split, models = write_data(workdir, args.images, args.models)
        print(f"{args.images} images in {len(shard_uris(split))} shards, {args.models} model(s) {MODEL}, "
              f"batch {args.batch_size}, threads {args.threads}, {args.num_actors} scoring actor(s), "
              f"{os.cpu_count()} CPUs", flush=True)
        for r in range(args.rounds):
            clocks = {"plain": Clock()}
            plain = plain_loop(split, models, args.batch_size, clocks["plain"])
            clocks["streamed"] = Clock()
            streamed = score_models(models, SplitConfig(uri=split, role="val"), batch_size=args.batch_size,
                                    num_actors=args.num_actors, resources=Resources(cpu=1), threads=args.threads,
                                    progress=clocks["streamed"])
            for side, clock in clocks.items():
                rates[side]["steady"].append(clock.steady_rate())
                rates[side]["total"].append(clock.total_rate())
            same = all(streamed[m]["correct"] == plain[m] for m in models)
            print(f"round {r + 1}: " + ", ".join(
                f"{side} {rates[side]['steady'][-1]:.0f} images/s steady ({rates[side]['total'][-1]:.0f} with start-up)"
                for side in clocks) + f"; same counts: {same}", flush=True)
            if not same:
                raise SystemExit(f"streamed and plain counts differ: {streamed} vs {plain}")
    ray.shutdown()
    best = {side: max(r["steady"]) for side, r in rates.items()}
    for side, r in rates.items():
        print(f"{side}: best {best[side]:.0f} images/s steady (median {statistics.median(r['steady']):.0f}); "
              f"with start-up best {max(r['total']):.0f} (median {statistics.median(r['total']):.0f})")
    print(f"ratio={best['streamed'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
