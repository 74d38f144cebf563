"""Rehearse the real ImageNet path offline, with tiny images: an ImageNet-shaped tree (WordNet-id
class folders for train and val, ImageNet-V2's numbered folders, ImageNet-R/-A's 200-class
subsets, ObjectNet's folders and mapping files, a Sketch-like set), imported as a user would
(`frankensoup import-images`, the train set shuffled with model soups' held-out mask as val),
then `configs/imagenet-vit-b32.yaml` run stage by stage, overriding only URIs and sizes: trials,
epochs, steps, the number of templates, and a local random-weights file for the model. Each stage
runs in its own process: its wall time and peak memory (the largest process, and the sampled
sum over its process tree, Ray's workers included) are printed.

Then prepare alone at two sizes (prompts = classes x templates, and id_test images), to show
its peak memory stays flat. Last line: ``prepare_peak_ratio=<peak at the larger sizes / at the
smaller> ok=<ratio <= 1.2>``.

    python bench/imagenet_rehearsal.py [--classes 1000] [--work /tmp/rehearsal] [--skip-run]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "imagenet-vit-b32.yaml")
MODEL = "ViT-B-32-quickgelu"
TEMPLATES = ["a photo of a {}.", "a bad photo of a {}."]


# ---- the tree --------------------------------------------------------------------------------

def jpeg(rng: np.random.Generator, size: int = 12) -> bytes:
    from PIL import Image

    sink = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sink, format="JPEG")
    return sink.getvalue()


def _unique_lemma_wnids(wnids: list[str]) -> list[str]:
    """WordNet ids whose lemma (ObjectNet's name for them) is not shared by another class."""
    from pipeline.data.imagenet import imagenet_wnids
    import pkgutil

    text = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode()
    lemma = dict(line.split("\t", 1) for line in text.splitlines())
    counts: dict[str, int] = {}
    for w in imagenet_wnids():
        counts[lemma[w]] = counts.get(lemma[w], 0) + 1
    return [w for w in wnids if counts[lemma[w]] == 1]


def write_objectnet_mappings(root: Path, folders: dict[str, str]) -> None:
    """ObjectNet's mappings/ folder in its own format for ``folders`` (folder -> WordNet id), with
    the ILSVRC-2012 ids in a shuffled order as in the real files, and one unmapped folder."""
    import pkgutil

    from pipeline.data.imagenet import imagenet_wnids

    text = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode()
    lemma = dict(line.split("\t", 1) for line in text.splitlines())
    wnids = imagenet_wnids()
    order = np.random.default_rng(0).permutation(len(wnids))  # 2012 id j is label index order[j]
    root.mkdir(parents=True, exist_ok=True)
    (root / "imagenet_to_label_2012_v2").write_text("".join(lemma[wnids[i]] + "\n" for i in order))
    (root / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(int(i)): j for j, i in enumerate(order)}))
    labels = {folder: folder.replace("_", " ").capitalize() for folder in folders}
    (root / "objectnet_to_imagenet_1k.json").write_text(json.dumps({labels[f]: lemma[w] for f, w in folders.items()}))
    (root / "folder_to_objectnet_label.json").write_text(json.dumps({**{f: labels[f] for f in folders},
                                                                     "air_freshener": "Air freshener"}))


def build_tree(root: Path, n_classes: int, train_per_class: int = 3, test_per_class: int = 1,
               ood_per_class: int = 1, seed: int = 0) -> dict:
    """The ImageNet-shaped tree under ``root`` for the first classes of a spread over the 1000
    (all 1000 with ``n_classes=1000``); returns what the imports need."""
    from pipeline.data.imagenet import imagenet_wnids, subset_wnids

    rng = np.random.default_rng(seed)
    every = list(imagenet_wnids())
    r_set, a_set = subset_wnids("imagenet-r"), subset_wnids("imagenet-a")
    if n_classes >= len(every):
        classes = every
    else:  # some of R's and A's classes among them, then a spread of the rest
        pick = set(r_set[: n_classes // 4]) | set(a_set[: n_classes // 4])
        pick |= set(every[:: max(1, len(every) // n_classes)][: n_classes - len(pick)])
        classes = sorted(pick)[:n_classes]
    shutil.rmtree(root, ignore_errors=True)

    def folder(path: Path, names: list[str]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for name in names:
            (path / name).write_bytes(jpeg(rng))

    mask = []
    for w in classes:  # ImageFolder's order: folders sorted, files sorted as strings
        names = sorted(f"{w}_{n}.JPEG" for n in rng.choice(13000, train_per_class + 1, replace=False))
        folder(root / "train" / w, names)
        held = int(rng.integers(len(names)))  # one per class held out, as the reference's 26 of ~1300
        mask += [int(i == held) for i in range(len(names))]
        folder(root / "val" / w, [f"ILSVRC2012_val_{rng.integers(1e8):08d}.JPEG" for _ in range(test_per_class)])
        folder(root / "sketch" / w, [f"sketch_{k}.JPEG" for k in range(ood_per_class)])
        folder(root / "imagenetv2" / str(every.index(w)), [f"{rng.bytes(8).hex()}.jpeg" for _ in range(ood_per_class)])
        if w in r_set:
            folder(root / "imagenet-r" / w, [f"art_{k}.jpg" for k in range(ood_per_class)])
        if w in a_set:
            folder(root / "imagenet-a" / w, [f"{k}.jpg" for k in range(ood_per_class)])
    np.save(root / "imagenet_98_idxs.npy", np.array(mask, dtype=np.float64))
    (root / "imagenet-v2-folders.tsv").write_text("".join(f"{every.index(w)}\t{w}\n" for w in classes))
    on_classes = _unique_lemma_wnids(classes)[:3]
    on_folders = {f"object_{i}": w for i, w in enumerate(on_classes)}
    for f in [*on_folders, "air_freshener"]:
        folder(root / "objectnet-1.0" / "images" / f, [f"{k}.png" for k in range(ood_per_class)])
    write_objectnet_mappings(root / "objectnet-1.0" / "mappings", on_folders)
    return {"classes": classes, "r": [w for w in classes if w in r_set], "a": [w for w in classes if w in a_set]}


def import_all(root: Path, data: Path, rows_per_shard: int = 256) -> None:
    """Every set through `frankensoup import-images`, as a user would (docs/data.md)."""
    shards = ["--rows-per-shard", str(rows_per_shard), "-q", "--serial"]
    commands = [
        ["train", "--out", data / "train-98p", "--role", "train", "--shuffle-seed", "0",
         "--holdout-indices", root / "imagenet_98_idxs.npy", "--holdout-out", data / "train-2p"],
        ["val", "--out", data / "val", "--role", "id_test"],
        ["imagenetv2", "--out", data / "imagenet-v2", "--role", "ood", "--classes", root / "imagenet-v2-folders.tsv"],
        ["sketch", "--out", data / "imagenet-sketch", "--role", "ood"],
        ["imagenet-r", "--out", data / "imagenet-r", "--role", "ood"],
        ["imagenet-a", "--out", data / "imagenet-a", "--role", "ood"],
        ["objectnet-1.0/images", "--out", data / "objectnet", "--role", "ood",
         "--objectnet-mappings", root / "objectnet-1.0" / "mappings"],
    ]
    from pipeline.cli import main as frankensoup

    for src, *rest in commands:  # the command line's own entry point, in this process
        if frankensoup(["import-images", str(root / src), *map(str, rest), *shards]) != 0:
            raise RuntimeError(f"import-images {root / src} failed")


def random_weights(path: Path) -> str:
    """A local weights file of the model with random weights (nothing is downloaded)."""
    if not path.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model(MODEL, pretrained=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def overrides(tree: dict, data: Path, out: Path, weights: str, templates: int = 2) -> list[str]:
    """The ImageNet config's URIs and sizes, nothing else."""
    sets = {"train": "train-98p", "val": "train-2p", "imagenet": "val", "imagenet-v2": "imagenet-v2",
            "imagenet-sketch": "imagenet-sketch", "imagenet-r": "imagenet-r", "imagenet-a": "imagenet-a",
            "objectnet": "objectnet"}
    out_sets = [f"data.splits.{name}.uri={data / folder}" for name, folder in sets.items()]
    out_sets.append(f"data.splits.objectnet.objectnet_mappings={data.parent / 'tree' / 'objectnet-1.0' / 'mappings'}")
    if len(tree["classes"]) < 1000:  # R's and A's 200 classes, cut to the classes the tree holds
        out_sets += [f"data.splits.imagenet-r.class_subset={json.dumps(tree['r'])}",
                     f"data.splits.imagenet-a.class_subset={json.dumps(tree['a'])}"]
    return [f"output_uri={out}", *out_sets, "data.rows_per_shard=256",
            f"model.pretrained={weights}", f"model.templates={json.dumps(TEMPLATES[:templates])}",
            "finetune.num_trials=2", "finetune.max_concurrent=1", "finetune.space.epochs=[1]",
            "finetune.batch_size=16", "finetune.warmup_steps=2", "finetune.threads=1", "finetune.loader_workers=1",
            "finetune.resources={cpu: 1, gpu: 0}",
            "evaluate.batch_size=64", "evaluate.num_actors=1", "evaluate.threads=1", "evaluate.resources={cpu: 1, gpu: 0}",
            "soup.max_func_evals_per_dim=1", "soup.phase2.evals_per_dim=1", "soup.num_evaluators=1",
            "soup.evaluator_resources={cpu: 1, gpu: 0}", "soup.wise_ft.alphas=[0.0, 0.5, 1.0]",
            "ray.address=local", "ray.num_cpus=2", "ray.autoscaling=false", "tracking.tensorboard=false"]


# ---- measuring a stage -----------------------------------------------------------------------

def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall seconds, its own peak RSS and the sampled peak RSS summed over its
    process tree (GiB)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree_peak = [0]
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                total = 0
            tree_peak[0] = max(tree_peak[0], total)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_gib": usage.ru_maxrss / 2**20,
            "tree_peak_gib": tree_peak[0] / 2**30, "output": output}


def stage(name: str, sets: list[str]) -> dict:
    args = [a for s in sets for a in ("--set", s)]
    return measured([sys.executable, "-m", "pipeline", name, "--config", CONFIG, *args])


def prepare_peak(work: Path, n_classes: int, templates: int, test_per_class: int, weights: str) -> dict:
    """prepare alone on a fresh tree of ``n_classes`` classes: its peak memory, with
    n_classes x templates prompts and n_classes x test_per_class id_test images."""
    root, data = work / "tree", work / "data"
    tree = build_tree(root, n_classes, train_per_class=1, test_per_class=test_per_class)
    import_all(root, data)
    result = stage("prepare", overrides(tree, data, work / "out", weights, templates))
    return {**result, "prompts": n_classes * templates, "id_test": n_classes * test_per_class}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000, help="classes of the tree for the run")
    ap.add_argument("--work", default="/tmp/frankensoup-rehearsal")
    ap.add_argument("--skip-run", action="store_true", help="only the two prepare sizes")
    ap.add_argument("--skip-sizes", action="store_true", help="only the run")
    ap.add_argument("--small", default="128,2,2", help="classes,templates,id_test images per class")
    ap.add_argument("--large", default="512,2,2", help="classes,templates,id_test images per class")
    args = ap.parse_args()
    work = Path(args.work)
    weights = random_weights(work / "weights" / f"{MODEL}-random.safetensors")

    if not args.skip_run:
        root, data, out = work / "run" / "tree", work / "run" / "data", work / "run" / "out"
        t0 = time.perf_counter()
        tree = build_tree(root, args.classes)
        import_all(root, data)
        print(f"tree of {args.classes} classes built and imported in {time.perf_counter() - t0:.1f}s")
        sets = overrides(tree, data, out, weights)
        for name in ("prepare", "finetune", "evaluate", "soup"):
            r = stage(name, sets)
            print(f"{name:<9} {r['seconds']:7.1f}s  peak {r['peak_gib']:.2f} GiB (driver), "
                  f"{r['tree_peak_gib']:.2f} GiB (process tree, sampled)", flush=True)
        table = [line for line in r["output"].splitlines() if line.startswith("|")]
        print("\n".join(table))

    if args.skip_sizes:
        return
    peaks = {}
    for label, spec in (("small", args.small), ("large", args.large)):
        n, t, k = (int(x) for x in spec.split(","))
        r = prepare_peak(work / f"prepare-{label}", n, t, k, weights)
        peaks[label] = r["peak_gib"]
        print(f"prepare {label}: {r['prompts']} prompts, {r['id_test']} id_test images: {r['seconds']:.1f}s, "
              f"peak {r['peak_gib']:.2f} GiB", flush=True)
    ratio = peaks["large"] / peaks["small"]
    print(f"prepare_peak_ratio={ratio:.3f} ok={ratio <= 1.2}")


if __name__ == "__main__":
    main()
