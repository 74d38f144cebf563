"""Seconds per mixture evaluation: MixtureEvaluator vs a bare forward pass, and vs the reference
implementation's way, for the demo model and a randomly initialised ViT-B-32 at 224 px.

    python bench/mixture_eval.py [--k 4] [--images-demo 512] [--images-vit 32]
                                 [--dtype float32|bfloat16] [--device cpu|cuda]

Per model, on the same K ingredients (random perturbations of the base weights) and images:
- ours: ``MixtureEvaluator.evaluate([beta])``: fuse into the resident model, forward over the
  resident preprocessed images;
- bare: a forward pass of one fixed model over the same resident tensors (no fusing);
- reference: what the reference implementation does per evaluation: mix on the CPU tensor by
  tensor into a new state dict, build a new model, load_state_dict, move it to the device,
  decode the images again from the shards, forward.
overhead_ratio = ours / bare (goal <= 1.15); reference_speedup = reference / ours (goal >= 3 for
the demo model). The last line of stdout is
``overhead_ratio=<worst of the two models> reference_speedup=<demo model>``.

Needs torch, open_clip (+ ftfy, wcwidth), numpy, pyarrow, pillow, safetensors: no Ray, pydantic
or nevergrad (so it runs on a GPU machine with only those).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# only modules that need torch, open_clip, pyarrow, pillow, safetensors (not pipeline.data's or
# pipeline.soup's package imports, which pull in pydantic and nevergrad)
from pipeline.evaluate.evaluator import MixtureEvaluator  # noqa: E402
from pipeline.model import components, image_transform, init_classifier, model_config  # noqa: E402
from pipeline.model.components import component_index  # noqa: E402
from pipeline.model.factory import DEMO_MODEL  # noqa: E402

N_CLASSES = {DEMO_MODEL: 10, "ViT-B-32": 1000}
GRANULARITY = 2  # one component per block: the demo config's soup.granularity
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def preprocess_of(name: str) -> dict:
    return {"size": model_config(name)["vision_cfg"]["image_size"], "mean": OPENAI_MEAN, "std": OPENAI_STD}


def write_images(path: str, name: str, n: int, seed: int, rows_per_shard: int = 256) -> list[str]:
    """n random RGB images at the model's input size as PNG parquet shards (image, label)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = preprocess_of(name)["size"]
    os.makedirs(path)
    files = []
    for start in range(0, n, rows_per_shard):
        pngs = []
        for _ in range(min(rows_per_shard, n - start)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        labels = rng.integers(0, N_CLASSES[name], len(pngs)).astype(np.int32)
        files.append(os.path.join(path, f"part-{len(files):05d}.parquet"))
        pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "label": pa.array(labels)}), files[-1])
    return files


def decode_shards(files: list[str], transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the shards and decode every image with the eval transform."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = [], []
    for f in files:
        table = pq.read_table(f)
        images += [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()]
        labels.append(torch.from_numpy(table.column("label").to_numpy().astype(np.int64)))
    return torch.stack(images), torch.cat(labels)


def mix_per_tensor(states: list[dict], beta: np.ndarray, component_of: dict[str, int]) -> dict:
    """The reference's fusion: a new state dict, tensor by tensor, on the CPU."""
    fused = {}
    for key, first in states[0].items():
        if key not in component_of:  # integer buffers are not mixed
            fused[key] = first.clone()
            continue
        c = component_of[key]
        fused[key] = sum(float(beta[j, c]) * sd[key] for j, sd in enumerate(states))
    return fused


def perturbed(state: dict, seed: int, scale: float = 0.02) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=gen)
            if v.is_floating_point() else v.clone() for k, v in state.items()}


def random_betas(k: int, c: int, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.ones(k), size=c).T for _ in range(n)]


def autocast(device: torch.device, dtype: str):
    # the evaluator's own rule: bf16 autocast on CUDA when ingredients are bf16
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and dtype == "bfloat16")


def count_correct(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device, dtype: str) -> int:
    with torch.inference_mode(), autocast(device, dtype):
        correct = torch.zeros((), dtype=torch.long, device=device)
        for s in range(0, len(images), batch_size):
            correct += (model(images[s:s + batch_size]).argmax(1) == labels[s:s + batch_size]).sum()
        return int(correct.item())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(ways: dict, repeats: int, device) -> dict[str, float]:
    """Median seconds per call of each way, after one warm-up call each. The ways take turns
    round by round, so a change in the machine's load hits all of them alike."""
    for fn in ways.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_model(name: str, k: int, n_images: int, dtype: str, device: torch.device, batch_size: int,
                repeats: int, workdir: str) -> dict:
    torch.manual_seed(0)
    base = init_classifier(name, N_CLASSES[name])
    comps = components(base, GRANULARITY)
    component_of = component_index(comps)
    states = [perturbed(base.state_dict(), seed) for seed in range(1, k + 1)]
    shards = write_images(os.path.join(workdir, name), name, n_images, seed=0)
    transform = image_transform(preprocess_of(name))
    images, labels = decode_shards(shards, transform)
    n_params = sum(p.numel() for p in base.parameters())

    ev = MixtureEvaluator(copy.deepcopy(base), states, comps, images, labels, dtype=dtype, device=device,
                          batch_size=batch_size)
    fixed = copy.deepcopy(base).to(device).eval()
    if dtype == "bfloat16":  # the same bf16-rounded weights the evaluator holds
        with torch.no_grad():
            for p in fixed.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    betas = iter(random_betas(k, len(comps), 2 * (repeats + 1), seed=1))

    def reference() -> int:
        fused = mix_per_tensor(states, next(betas), component_of)  # per-tensor CPU mixing
        model = init_classifier(name, N_CLASSES[name])          # a newly built model
        model.load_state_dict(fused)
        model.to(device).eval()
        x, y = decode_shards(shards, transform)                 # images decoded again
        return count_correct(model, x.to(device), y.to(device), batch_size, device, dtype)

    t = timed_interleaved({"ours": lambda: ev.evaluate([next(betas)]),
                           "bare": lambda: count_correct(fixed, ev.images, ev.labels, batch_size, device, dtype),
                           "reference": reference}, repeats, device)
    ours, bare, ref = t["ours"], t["bare"], t["reference"]
    return {"model": name, "params": n_params, "k": k, "repeats": repeats, "components": len(comps),
            "images": n_images, "ours_s": ours, "bare_s": bare, "reference_s": ref, "images_per_s": n_images / ours,
            "overhead_ratio": ours / bare, "reference_speedup": ref / ours}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4, help="ingredients (default 4)")
    p.add_argument("--images-demo", type=int, default=512, help="images for the demo model (default 512)")
    p.add_argument("--images-vit", type=int, default=32,
                   help="images for ViT-B-32 (default 32: slow on a CPU; use thousands on a GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="ingredient dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats-demo", type=int, default=15,
                   help="timed rounds for the demo model (each way once per round, median reported; default 15)")
    p.add_argument("--repeats-vit", type=int, default=3, help="timed rounds for ViT-B-32 (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch CPU threads, the same for every side (default: all cores)")
    p.add_argument("--models", default=f"{DEMO_MODEL},ViT-B-32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.models.split(",")
    unknown = [n for n in names if n not in N_CLASSES]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(N_CLASSES)}")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {args.threads}, dtype {args.dtype}, K {args.k}, "
          f"batch {args.batch_size}, granularity {GRANULARITY}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mixture-") as workdir:
        for name in names:
            images, repeats = ((args.images_demo, args.repeats_demo) if name == DEMO_MODEL
                               else (args.images_vit, args.repeats_vit))
            r = bench_model(name, args.k, images, args.dtype, device, args.batch_size, repeats, workdir)
            results.append(r)
            print(f"{r['model']}: {r['params']:,} params, K={r['k']}, {r['components']} components, "
                  f"{r['images']} images, {r['repeats']} rounds | "
                  f"ours {r['ours_s'] * 1e3:.1f} ms/eval ({r['images_per_s']:.0f} images/s), "
                  f"bare forward {r['bare_s'] * 1e3:.1f} ms, reference {r['reference_s'] * 1e3:.1f} ms | "
                  f"overhead_ratio {r['overhead_ratio']:.3f}, reference_speedup {r['reference_speedup']:.2f}",
                  flush=True)
    demo = next((r for r in results if r["model"] == DEMO_MODEL), results[0])
    print(f"overhead_ratio={max(r['overhead_ratio'] for r in results):.3f} "
          f"reference_speedup={demo['reference_speedup']:.2f}")


if __name__ == "__main__":
    main()
