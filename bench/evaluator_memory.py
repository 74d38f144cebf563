"""Peak resident ingredient bytes of one mixture evaluator during a phase-1 search, against the
number of ingredients K: the working set (rows loaded when a mixture first uses them, the least
recently used evicted within ``working_set_gb``), not process RSS.

For K = 8, 32 and 128 synthetic ingredients (random perturbations of one small ViT classifier;
labels mostly the predictions of the first four's average, so a few candidates join the soup), the paper's search
(NGOpt -> Cobyla, W = 1) runs on one in-process MixtureEvaluator whose working set holds
``--rows`` rows (phase 1 needs the soup's chosen rows plus the candidate in flight). Each row of
the table: the peak rows resident, their bytes, rows read (an evicted row used again is read
again), and whether the result equals the same search with every row resident (K <= 32).

    python bench/evaluator_memory.py              # ~2 minutes on one core
Last line: ``rows_max_K128=<n> mem_ratio_K128_K8=<peak bytes at K=128 / at K=8>``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import SoupConfig  # noqa: E402
from pipeline.evaluate.evaluator import MixtureEvaluator, row_bytes  # noqa: E402
from pipeline.model.classifier import Classifier  # noqa: E402
from pipeline.model.components import components  # noqa: E402
from pipeline.soup import mixing, mmms  # noqa: E402

warnings.filterwarnings("ignore", message="COBYLA")


def world(K: int, n_images: int, seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2,
                                                              head_width=16, mlp_ratio=2.0),
                                text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    base = Classifier(clip.visual, torch.nn.Linear(16, 10)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    state = base.state_dict()
    ingredients = [{k: v + 0.3 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=gen)
                    if v.is_floating_point() else v.clone() for k, v in state.items()} for _ in range(K)]
    images = torch.randn(n_images, 3, 16, 16, generator=gen)
    teacher = copy.deepcopy(base)  # the average of the first 4 labels most images: a few join, as in the reference
    teacher.load_state_dict({k: torch.stack([i[k] for i in ingredients[:4]]).mean(0) if v.is_floating_point() else v
                             for k, v in state.items()})
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    labels[n_images * 2 // 3:] = torch.randint(0, 10, (n_images - n_images * 2 // 3,), generator=gen)
    return base, ingredients, components(base, 1), images, labels


def search(K: int, rows: int | None, args) -> dict:
    base, ingredients, comps, images, labels = world(K, args.images)
    n_params = sum(p.numel() for p in base.parameters())
    budget = None if rows is None else rows * row_bytes(n_params, "float32") / (1 << 30)
    ev = MixtureEvaluator(base, ingredients, comps, images, labels, device="cpu", batch_size=32, threads=1,
                          working_set_gb=budget)
    C = len(comps)
    val_accs = [ev.evaluate([mixing.one_hot(K, C, j)])[0] for j in range(K)]
    ev.working_set.peak_rows = len(ev.working_set.rows)  # the ingredients' own scores are not the search
    cfg = SoupConfig(optimizer="NGOpt", num_workers=1, max_func_evals_per_dim=args.evals_per_dim)
    result = mmms.phase1(val_accs, C, ev, cfg)
    ws = ev.working_set
    return {"K": K, "peak_rows": ws.peak_rows, "peak_bytes": ws.peak_rows * ws.row_bytes, "loads": ws.loads,
            "evaluations": result.n_evals, "chosen": len(result.chosen), "beta": result.beta}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--rows", type=int, default=8, help="rows the working set may hold (default 8)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--evals-per-dim", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"working set: {args.rows} rows; {args.images} val images; NGOpt W = 1, "
          f"{args.evals_per_dim} evaluations per dimension")
    print(f"{'K':>4} {'peak rows':>9} {'peak bytes':>11} {'rows read':>9} {'evaluations':>11} {'chosen':>6}  "
          f"same as all resident")
    rows = {}
    for K in ks:
        r = search(K, args.rows, args)
        same = np.array_equal(r["beta"], search(K, None, args)["beta"]) if K <= 32 else "-"
        rows[K] = r
        print(f"{K:>4} {r['peak_rows']:>9} {r['peak_bytes']:>11,} {r['loads']:>9} {r['evaluations']:>11} "
              f"{r['chosen']:>6}  {same}", flush=True)
        if same is False:
            raise SystemExit(f"K={K}: the bounded working set changed the result")
    big, small = rows[max(ks)], rows[min(ks)]
    print(f"rows_max_K{max(ks)}={big['peak_rows']} mem_ratio_K{max(ks)}_K{min(ks)}="
          f"{big['peak_bytes'] / small['peak_bytes']:.2f}")
    return rows


if __name__ == "__main__":
    main()
