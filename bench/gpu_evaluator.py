"""Evaluations per second of one mixture evaluator per GPU, with val unsharded (S = 1: one GPU
scores every image of a mixture) and sharded over every GPU (S = G: each GPU scores its shard
of whole batches, the integer counts are summed), on a random ViT-B-32 in bfloat16 with 10,000
random val images: what E GPUs buy for one evaluation, the paper's search's critical path.

    python bench/gpu_evaluator.py                   # needs CUDA; one evaluator per GPU
    python bench/gpu_evaluator.py --tiny            # the CPU check the test suite runs

Each GPU holds its own MixtureEvaluator (its own model, K ingredient rows, the random float
val images). Shards run side by side in one thread per GPU (CUDA kernels release the GIL). The sharded and
unsharded accuracies must be equal, or the bench fails. Last line:
``evals_per_s_S1=<x> evals_per_s_SG=<y> speedup=<y/x> gpus=<G> identical=True``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.evaluate.evaluator import MixtureEvaluator  # noqa: E402
from pipeline.mixture import ShardCount  # noqa: E402
from pipeline.model import components, init_classifier  # noqa: E402
from pipeline.model.factory import DEMO_MODEL  # noqa: E402


def evaluators(model: str, n_classes: int, k: int, n_images: int, size: int, devices: list[str], dtype: str,
               batch_size: int) -> list[MixtureEvaluator]:
    torch.manual_seed(0)
    base = init_classifier(model, n_classes)
    comps = components(base, 2)
    state = base.state_dict()
    gen = torch.Generator().manual_seed(1)
    ingredients = [{n: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1
                    else v.clone() for n, v in state.items()} for _ in range(k)]
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, n_classes, (n_images,), generator=torch.Generator().manual_seed(3))
    out = []
    for device in devices:
        model_copy = init_classifier(model, n_classes)
        model_copy.load_state_dict(state)
        out.append(MixtureEvaluator(model_copy, ingredients, comps, images, labels, dtype=dtype, device=device,
                                    batch_size=batch_size))
    return out


def run(args) -> dict:
    if args.tiny:
        devices = ["cpu", "cpu"]
        model, n_classes, size = DEMO_MODEL, 10, 16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU check")
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        model, n_classes, size = "ViT-B-32", 1000, 224
    G = len(devices)
    evs = evaluators(model, n_classes, args.k, args.images, size, devices, args.dtype, args.batch_size)
    k, c = evs[0].beta_shape
    rng = np.random.default_rng(0)
    betas = [rng.dirichlet(np.ones(k), size=c).T for _ in range(args.evaluations + 1)]
    bounds = evs[0].shards(G)

    def sync():
        if not args.tiny:
            for d in devices:
                torch.cuda.synchronize(d)

    evs[0].evaluate(betas[:1])  # warm-up
    sync()
    t0 = time.perf_counter()
    unsharded = evs[0].evaluate(betas[1:])
    sync()
    s1 = args.evaluations / (time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=G) as pool:
        def one(beta) -> float:
            counts: list[ShardCount] = list(pool.map(lambda i: evs[i].score_shard(beta, *bounds[i]), range(len(bounds))))
            return sum(x.correct for x in counts) / args.images

        one(betas[0])
        sync()
        t0 = time.perf_counter()
        sharded = [one(b) for b in betas[1:]]
        sync()
        sg = args.evaluations / (time.perf_counter() - t0)
    return {"s1": s1, "sg": sg, "gpus": G, "identical": sharded == unsharded, "devices": devices, "model": model}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the demo model on the CPU (two evaluators), a few images")
    p.add_argument("--images", type=int, default=None, help="val images (default 10,000; --tiny 64)")
    p.add_argument("--k", type=int, default=4, help="ingredients")
    p.add_argument("--evaluations", type=int, default=None, help="timed evaluations (default 5; --tiny 2)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--batch-size", type=int, default=None, help="default 500; --tiny 16")
    args = p.parse_args(argv)
    args.images = args.images or (64 if args.tiny else 10_000)
    args.evaluations = args.evaluations or (2 if args.tiny else 5)
    args.batch_size = args.batch_size or (16 if args.tiny else 500)
    r = run(args)
    print(f"{r['model']} on {', '.join(r['devices'])}: {args.images} images, K {args.k}, {args.dtype}, "
          f"batch {args.batch_size}; S=1 {r['s1']:.3f} evaluations/s, S={r['gpus']} {r['sg']:.3f} evaluations/s")
    print(f"evals_per_s_S1={r['s1']:.3f} evals_per_s_SG={r['sg']:.3f} speedup={r['sg'] / r['s1']:.2f} "
          f"gpus={r['gpus']} identical={r['identical']}")
    if not r["identical"]:
        raise SystemExit("sharded accuracies differ from unsharded ones")
    return r


if __name__ == "__main__":
    main()
