"""Rehearse the real ImageNet path offline, with tiny images: an ImageNet-shaped tree (WordNet-id
class folders for train and val, ImageNet-V2's numbered folders, ImageNet-R/-A's 200-class
subsets, ObjectNet's folders and mapping files, a Sketch-like set), imported as a user would
(`frankensoup import-images`, the train set shuffled with model soups' held-out mask as val),
then `configs/imagenet-vit-b32.yaml` run stage by stage, overriding only URIs and sizes: trials,
epochs, steps, the number of templates, and a local random-weights file for the model (with
``--run-model tiny``, also the architecture). `finetune.init: linear_probe`, set in the config,
is kept: the finetune stage trains the probe first (its line is printed). Each stage runs in its
own process: its wall time and peak memory (the largest process, and the sampled sum over its
process tree, Ray's workers included) are printed; then `frankensoup run` on the same outputs,
which must reuse everything.

Then prepare alone at two sizes, by default the issue's: 500 prompts (classes x templates) and
2,000 id_test images, then 2,000 prompts and 20,000 images. Each size is measured twice, each
in its own process: `frankensoup prepare` (prompts embedded a few classes at a time, id_test
scored shard by shard, batch by batch), and the plain way the code had before (all prompts
through the text tower at once, ``num_classes_per_batch=None``, and every id_test image decoded
into one float32 tensor). The last two lines: ``plain_peak_ratio=<...>`` and
``prepare_peak_ratio=<peak at the larger sizes / at the smaller> ok=<ratio <= 1.2>``.

Which model each part uses, and why:
- the sizes (``--sizes-model``, default ``tiny``): ViT-B-32's text tower costs ~10 GFLOP per
  prompt and its image tower ~4.4 per image, so 2,000 prompts and 20,000 images are hours on 2
  CPU cores, and its load (the weights file and the model side by side, ~2.6 GB) is larger than
  anything the data adds at sizes that run here. ``tiny`` is an open_clip architecture written
  as a ``local-dir:`` config (no weights, random init, saved to a local file like ViT-B-32's):
  QuickGELU and the text context of 77 tokens as ViT-B-32-quickgelu, but 2 layers of width 128
  per tower and 64-pixel images (patch 16). Its load is small, so what the data costs shows: the
  plain way's 20,000 decoded images alone take ~1 GB at 64 px (~12 GB at 224 px, more than this
  machine has to spare). The code path is the ImageNet config's; only ``model.name`` and
  ``model.pretrained`` change.
- the run (``--run-model``, default ``ViT-B-32-quickgelu``, the config's own): 1000 classes of
  ViT-B-32 are hours here, so the 1000-class run was measured with ``--run-model tiny``, and
  ViT-B-32 at 50 classes (docs/data.md).

    python bench/imagenet_rehearsal.py [--classes 1000] [--run-model tiny] [--work /tmp/rehearsal]
                                       [--skip-run | --skip-sizes] [--sizes-model tiny]
"""
from __future__ import annotations

import argparse
import hashlib
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
# a small open_clip architecture for measuring what the data costs (why: the module docstring):
# ViT-B-32-quickgelu's activation and text context, 2 layers of width 128, 64-pixel images
TINY = "tiny"
TINY_CONFIG = {
    "model_cfg": {"embed_dim": 128, "quick_gelu": True,
                  "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}},
    "preprocess_cfg": {"size": 64, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}
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
        for w in [*every[:: max(1, len(every) // n_classes)], *every]:  # exactly n_classes
            if len(pick) == n_classes:
                break
            pick.add(w)
        classes = sorted(pick)
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


def architecture(work: Path, model: str) -> str:
    """The open_clip model name for ``model``: a registered name as it is, or ``tiny``, written
    under ``work`` as a ``local-dir:`` config (architecture and preprocessing, no weights)."""
    if model != TINY:
        return model
    folder = work / "tiny-architecture"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "open_clip_config.json"
    if not config.exists() or json.loads(config.read_text()) != TINY_CONFIG:
        config.write_text(json.dumps(TINY_CONFIG, indent=2))
    return f"local-dir:{folder}"


def random_weights(path: Path, model: str = MODEL) -> str:
    """A local weights file of ``model`` (an open_clip name) with random weights (nothing is
    downloaded)."""
    if not path.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        clip = open_clip.create_model(model, pretrained=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return str(path)


def model_files(work: Path, model: str) -> tuple[str, str]:
    """(model name, its local random-weights file) for ``model`` (``tiny`` or an open_clip name)."""
    name = architecture(work, model)
    # the tiny architecture's file is named by its config, so an edited config never loads stale weights
    tag = f"-{hashlib.sha256(json.dumps(TINY_CONFIG).encode()).hexdigest()[:8]}" if model == TINY else ""
    return name, random_weights(work / "weights" / f"{model}{tag}-random.safetensors", name)


def overrides(tree: dict, data: Path, out: Path, weights: str, templates: int = 2, model: str = MODEL) -> list[str]:
    """The ImageNet config's URIs and sizes, nothing else (and ``model.name`` when ``model`` is
    not the config's)."""
    sets = {"train": "train-98p", "val": "train-2p", "imagenet": "val", "imagenet-v2": "imagenet-v2",
            "imagenet-sketch": "imagenet-sketch", "imagenet-r": "imagenet-r", "imagenet-a": "imagenet-a",
            "objectnet": "objectnet"}
    out_sets = [f"data.splits.{name}.uri={data / folder}" for name, folder in sets.items()]
    out_sets.append(f"data.splits.objectnet.objectnet_mappings={data.parent / 'tree' / 'objectnet-1.0' / 'mappings'}")
    if len(tree["classes"]) < 1000:  # R's and A's 200 classes, cut to the classes the tree holds
        out_sets += [f"data.splits.imagenet-r.class_subset={json.dumps(tree['r'])}",
                     f"data.splits.imagenet-a.class_subset={json.dumps(tree['a'])}"]
    name = [] if model == MODEL else [f"model.name={model}"]
    return [f"output_uri={out}", *out_sets, "data.rows_per_shard=256", *name,
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


def stage(name: str, sets: list[str], retries: int = 1) -> dict:
    """`frankensoup <name>` on the ImageNet config with ``sets``, measured. Ray gives its node 30 s
    to start; on a loaded machine it may not, and the stage (keyed, so nothing done is redone) is
    run once more, saying so."""
    args = [a for s in sets for a in ("--set", s)]
    try:
        return measured([sys.executable, "-m", "pipeline", name, "--config", CONFIG, *args])
    except RuntimeError as e:
        if retries <= 0 or "timed out during startup" not in str(e):
            raise
        print(f"{name}: Ray's node did not start within its 30 s (a loaded machine): running it again", flush=True)
        return stage(name, sets, retries - 1)


def plain_prepare(sets: list[str]) -> None:
    """What prepare computed before issue 18, the plain way, on the config of ``sets``: the base
    CLIP, the zero-shot head from every prompt through the text tower at once
    (``num_classes_per_batch=None``), and its id_test accuracy from every id_test image decoded
    into one float32 tensor. Run in its own process (``--plain-prepare``) to measure its peak."""
    import open_clip
    import torch

    from pipeline import layout
    from pipeline.config import load_config
    from pipeline.data import shards
    from pipeline.data.imagenet import prompt_names
    from pipeline.inputs import class_names
    from pipeline.model import classifier as clf_lib
    from pipeline.model import factory
    from pipeline.model.pretrain import zero_shot_accuracy

    cfg = load_config(CONFIG, sets)
    clip, preprocess = factory.create_clip(cfg.model.name, cfg.model.pretrained)
    names = class_names(cfg)
    templates = clf_lib.resolve_templates(cfg.model.templates)
    text_emb = open_clip.build_zero_shot_classifier(
        clip, factory.tokenizer_for(cfg.model.name), prompt_names(names, cfg.model.prompt_names), templates,
        num_classes_per_batch=None, device=clip.logit_scale.device)
    head = torch.nn.Linear(text_emb.shape[0], len(names))
    with torch.no_grad():
        head.weight.copy_(clip.logit_scale.exp() * text_emb.T)
        head.bias.zero_()
    clf = clf_lib.Classifier(clip.visual, head).eval()
    _, test = layout.split_of_role(cfg, "id_test")
    images, labels = shards.decode_split(shards.read_split(test.uri), factory.image_transform(preprocess, train=False))
    with torch.inference_mode():
        accuracy = zero_shot_accuracy(clf, images, labels, batch_size=512)
    print(f"plain prepare: {len(names) * len(templates)} prompts at once, {len(images)} id_test images "
          f"decoded ({images.nbytes / 2**30:.2f} GiB): zero-shot accuracy on id_test = {accuracy:.4f}")


def prepare_peaks(work: Path, n_classes: int, templates: int, test_per_class: int, model: str) -> dict:
    """prepare alone on a fresh tree of ``n_classes`` classes (n_classes x templates prompts,
    n_classes x test_per_class id_test images), then the plain way on the same shards, each in
    its own process: their results (wall time, peak memory)."""
    root, data = work / "tree", work / "data"
    name, weights = model_files(work.parent, model)
    tree = build_tree(root, n_classes, train_per_class=1, test_per_class=test_per_class)
    import_all(root, data)
    sets = overrides(tree, data, work / "out", weights, templates, name)
    shutil.rmtree(work / "out", ignore_errors=True)
    ours = stage("prepare", sets)
    (work / "sets.json").write_text(json.dumps(sets))
    plain = measured([sys.executable, str(Path(__file__).resolve()), "--plain-prepare", str(work / "sets.json")])
    n = len(tree["classes"])
    return {"ours": ours, "plain": plain, "prompts": n * templates, "id_test": n * test_per_class}


def _line(output: str, text: str) -> str:
    """The first line of ``output`` holding ``text`` (stripped), or ""."""
    return next((line.strip() for line in output.splitlines() if text in line), "")


def main() -> None:
    if sys.argv[1:2] == ["--plain-prepare"]:  # the plain way, in the process measured()
        return plain_prepare(json.loads(Path(sys.argv[2]).read_text()))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000, help="classes of the tree for the run")
    ap.add_argument("--work", default="/tmp/frankensoup-rehearsal")
    ap.add_argument("--skip-run", action="store_true", help="only the two prepare sizes")
    ap.add_argument("--skip-sizes", action="store_true", help="only the run")
    ap.add_argument("--run-model", default=MODEL,
                    help=f"the run's model: an open_clip name, or {TINY!r} (a small architecture, random weights)")
    ap.add_argument("--sizes-model", default=TINY,
                    help=f"the model prepare is measured with at the two sizes: {TINY!r} (default: small, so the "
                         f"model's load does not hide what the data costs) or an open_clip name")
    ap.add_argument("--small", default="250,2,8", help="classes,templates,id_test images per class")
    ap.add_argument("--large", default="1000,2,20", help="classes,templates,id_test images per class")
    args = ap.parse_args()
    work = Path(args.work)

    if not args.skip_run:
        name, weights = model_files(work, args.run_model)
        root, data, out = work / "run" / "tree", work / "run" / "data", work / "run" / "out"
        t0 = time.perf_counter()
        tree = build_tree(root, args.classes)
        import_all(root, data)
        print(f"tree of {args.classes} classes built and imported in {time.perf_counter() - t0:.1f}s; "
              f"model {args.run_model}", flush=True)
        sets = overrides(tree, data, out, weights, model=name)
        shutil.rmtree(out, ignore_errors=True)
        for stage_name in ("prepare", "finetune", "evaluate", "soup"):
            r = stage(stage_name, sets)
            print(f"{stage_name:<9} {r['seconds']:7.1f}s  peak {r['peak_gib']:.2f} GiB (driver), "
                  f"{r['tree_peak_gib']:.2f} GiB (process tree, sampled)", flush=True)
            if stage_name == "finetune":
                probe = _line(r["output"], "finetune: linear probe")
                if not probe:  # the ImageNet config starts every trial from the linear probe
                    raise RuntimeError("finetune ran no linear probe:\n" + r["output"][-4000:])
                print(f"          {probe}", flush=True)
        print("\n".join(line for line in r["output"].splitlines() if line.startswith("|")))
        again = stage("run", sets)  # `frankensoup run` on the same outputs: every stage reused
        print(f"run       {again['seconds']:7.1f}s  after the stages, on the same outputs:", flush=True)
        print("\n".join(f"          {line.strip()}" for line in again["output"].splitlines() if line.startswith("== ")))

    if args.skip_sizes:
        return
    peaks = {}
    for label, spec in (("small", args.small), ("large", args.large)):
        n, t, k = (int(x) for x in spec.split(","))
        r = prepare_peaks(work / f"prepare-{label}", n, t, k, args.sizes_model)
        peaks[label] = r
        for way in ("ours", "plain"):
            print(f"prepare {label} ({way:<5}): {r['prompts']} prompts, {r['id_test']} id_test images, "
                  f"model {args.sizes_model}: {r[way]['seconds']:.1f}s, peak {r[way]['peak_gib']:.2f} GiB", flush=True)
        print(f"  {_line(r['ours']['output'], 'zero-shot accuracy on id_test')}")
        print(f"  {_line(r['plain']['output'], 'plain prepare:')}", flush=True)
    plain = peaks["large"]["plain"]["peak_gib"] / peaks["small"]["plain"]["peak_gib"]
    ratio = peaks["large"]["ours"]["peak_gib"] / peaks["small"]["ours"]["peak_gib"]
    print(f"plain_peak_ratio={plain:.3f} (all prompts at once, all id_test images decoded)")
    print(f"prepare_peak_ratio={ratio:.3f} ok={ratio <= 1.2}")


if __name__ == "__main__":
    main()
