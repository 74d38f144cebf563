"""Publishing a soup result: ``output_uri/soup/<run-id>/`` written in full, verified against a
manifest, and only then named by ``soup/LATEST``. A crash before the pointer moves leaves the
previous result (and LATEST) in force, and the half-written directory is removed."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping

import torch

from .. import layout, storage
from ..config import Config
from ..model import factory
from ..model.weights import load_state_strict

FUSED_DIR = "fused"
HEAD_FILE = "head.safetensors"
CLASSNAMES_FILE = "classnames.json"
CARD_FILE = "README.md"
HEAD_FORMAT = "frankensoup-head-v1"


def make_run_id(key: str, now: float | None = None) -> str:
    """Timestamp (sortable) + the soup key, so a run-id says when and from what inputs."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{key[:8]}"


def run_uri(cfg: Config, run_id: str) -> str:
    return storage.join(layout.soup_root(cfg), run_id)


def fused_clip(base_clip: torch.nn.Module, classifier_state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """The base CLIP with its image tower replaced by the fused classifier's ``visual.*``
    (the text tower stays the base model's). Modifies and returns ``base_clip``."""
    visual = {k[len("visual."):]: v for k, v in classifier_state.items() if k.startswith("visual.")}
    load_state_strict(base_clip.visual, visual, source)
    return base_clip


def head_bytes(classifier_state: dict[str, torch.Tensor], model_name: str, class_names: list[str]) -> bytes:
    from safetensors.torch import save

    tensors = {"weight": classifier_state["head.weight"].contiguous(),
               "bias": classifier_state["head.bias"].contiguous()}
    return save(tensors, metadata={"format": HEAD_FORMAT, "model_name": model_name,
                                   "class_names": json.dumps(list(class_names))})


def fused_files(base_clip: torch.nn.Module, model_name: str, preprocess: dict,
                classifier_state: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, bytes]:
    """``fused/`` as bytes: a full CLIP open_clip loads with ``local-dir:``, the head, class names."""
    clip = fused_clip(base_clip, classifier_state, "the fused classifier")
    files = {f"{FUSED_DIR}/{name}": data for name, data in factory.clip_files(clip, model_name, preprocess).items()}
    files[f"{FUSED_DIR}/{HEAD_FILE}"] = head_bytes(classifier_state, model_name, class_names)
    files[f"{FUSED_DIR}/{CLASSNAMES_FILE}"] = json.dumps(list(class_names), indent=2).encode()
    return files


CARD_TAGS = ["clip", "open_clip", "image-classification", "model-soups", "manifold-mixing-model-soup", "frankensoup"]


def hub_base_model(model_name: str, pretrained: str) -> str | None:
    """The Hub id of the base weights where open_clip's pretrained cfg names one
    (ViT-B-32/openai -> timm/vit_base_patch32_clip_224.openai); None for the demo or a file."""
    import open_clip

    hub = open_clip.get_pretrained_cfg(model_name, pretrained).get("hf_hub") or ""
    return hub.strip("/") or None


def card_metadata(report: Mapping) -> dict:
    """The card's YAML front matter for the Hugging Face Hub, from report.json: library, task,
    license, base model, tags, datasets and a model-index with the published model's accuracy per split."""
    cfg = report["config"]
    card = cfg.get("card", {})  # reports of earlier versions have no card section
    meta: dict = {"library_name": "open_clip", "pipeline_tag": "image-classification",
                  "license": card.get("license", "apache-2.0")}
    base = hub_base_model(cfg["model"]["name"], cfg["model"]["pretrained"])
    if base:
        meta["base_model"] = base
    meta["tags"] = list(dict.fromkeys([*CARD_TAGS, *card.get("tags", [])]))
    if card.get("datasets"):
        meta["datasets"] = list(card["datasets"])
    model, splits = report["methods"][report.get("published", "mmms")], report["splits"]
    accuracies = [(splits["val"], "val", model["val"]), (splits["id_test"], "id_test", model["id_test"]),
                  *[(name, "ood", model["ood"][name]) for name in splits["ood"]]]
    meta["model-index"] = [{"name": f"frankensoup-{report.get('run_id', 'fused')}", "results": [
        {"task": {"type": "image-classification", "name": "Image Classification"},
         "dataset": {"name": name, "type": name, "split": role},
         "metrics": [{"type": "accuracy", "value": round(100 * float(acc), 2), "name": "top-1 accuracy (%)"}]}
        for name, role, acc in accuracies]}]
    return meta


def front_matter(report: Mapping) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(card_metadata(report), sort_keys=False, width=100) + "---\n\n"


def model_card(report: Mapping, preprocess: Mapping, class_names: list[str]) -> str:
    """``fused/README.md``: what the model is, how it was made, its results, how to load it."""
    from ..report.results import markdown_table

    cfg, soup = report["config"], report["config"]["soup"]
    name = report.get("published", "mmms")
    published = report["methods"][name]
    ids = list(report.get("ingredient_scores") or published["ingredients"])
    components = list(report["components"])
    evaluations = report.get("evaluations", {})
    size = preprocess["size"]
    size_text = f"{size}x{size}" if isinstance(size, int) else "x".join(str(s) for s in size)
    lines = [
        f"# frankensoup fused model — run {report.get('run_id', '?')}",
        "",
        f"An image classifier over {len(class_names)} classes: the image tower of the open_clip "
        f"model `{cfg['model']['name']}` (base weights: `{cfg['model']['pretrained']}`) with a linear "
        f"head, made from finetuned copies of it by the soup method **{name}** ({method_summary(name)}). "
        "It costs the same at inference as one model. The text tower in "
        "`open_clip_model.safetensors` is the base model's, unchanged.",
        "",
        "## How it was made",
        "",
        f"- ingredients: {len(ids)} finetunes of the zero-shot classifier ({', '.join(ids)})",
        *how_it_was_made(report, name, published, soup, components),
        f"- mixtures evaluated by the soup's search: {evaluations.get('evaluated', '?')} (on the val split "
        f"`{report['splits']['val']}`, which every method's choices maximise)",
        "",
        "## Results",
        "",
        "Top-1 accuracy in %, 95 % interval in brackets; each row a method built from the same "
        f"ingredients, measured on its model as published (`{name}` is this model):",
        "",
        markdown_table(report),
        "",
        "Images per split: " + ", ".join(f"{s} {n}" for s, n in report["split_sizes"].items()) + ".",
        "",
        "## Input normalisation",
        "",
        f"RGB images, resized ({preprocess.get('resize_mode', 'shortest')} side, "
        f"{preprocess.get('interpolation', 'bicubic')}) and center-cropped to {size_text}, scaled to "
        f"[0, 1], then normalised per channel with mean {list(preprocess['mean'])} and std "
        f"{list(preprocess['std'])} (`preprocess_cfg` in `open_clip_config.json`; open_clip's transform "
        "below does all of it). The head takes the image embedding **L2-normalised**: "
        "`logits = normalize(encode_image(x)) @ weight.T + bias`.",
        "",
        "## How to load it",
        "",
        "```python",
        "import json, open_clip, torch",
        "from PIL import Image",
        "from safetensors.torch import load_file",
        "",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:path/to/fused")',
        'head = load_file("path/to/fused/head.safetensors")          # weight (classes x dim), bias',
        'class_names = json.load(open("path/to/fused/classnames.json"))',
        "model.eval()",
        'x = preprocess(Image.open("image.jpg").convert("RGB")).unsqueeze(0)',
        "with torch.no_grad():",
        "    features = torch.nn.functional.normalize(model.encode_image(x), dim=-1)",
        '    logits = features @ head["weight"].T + head["bias"]',
        "print(class_names[logits.argmax(-1).item()])",
        "```",
        "",
        "`local-dir:` needs open_clip_torch 3.0 or later. With frankensoup installed: "
        '`from pipeline import load_fused; model, preprocess, class_names = load_fused("<this run or output_uri>")`, '
        "or `frankensoup predict <uri> image.jpg`.",
        "",
        "### From the Hugging Face Hub",
        "",
        "Upload this folder as a model repository (`hf upload <user>/<repo> path/to/fused .`); then the "
        "model, its head and its class names all come from the Hub:",
        "",
        "```python",
        "import json, open_clip",
        "from huggingface_hub import hf_hub_download",
        "from safetensors.torch import load_file",
        "",
        'repo = "<user>/<repo>"',
        'model, _, preprocess = open_clip.create_model_and_transforms(f"hf-hub:{repo}")',
        'head = load_file(hf_hub_download(repo, "head.safetensors"))',
        'class_names = json.load(open(hf_hub_download(repo, "classnames.json")))',
        "```",
        "",
        "and classify as above.",
    ]
    return front_matter(report) + "\n".join(lines) + "\n"


def method_summary(name: str) -> str:
    from .methods import SOUP_METHODS

    return SOUP_METHODS[name].summary if name in SOUP_METHODS else "a soup method"


def how_it_was_made(report: Mapping, name: str, published: Mapping, soup: Mapping, components: list) -> list[str]:
    """The model card's lines on how the published method made the model."""
    out = []
    beta = published.get("beta") or []
    if beta:
        mixed = [i for i, row in zip(published["ingredients"], beta) if any(row)]
        out.append(f"- the soup mixes {len(mixed)} of them ({', '.join(mixed)}) per component; components "
                   f"({len(components)}, granularity {soup['granularity']}): {', '.join(components)}")
    if name in ("mmms", "mmms_phase1"):
        phase2 = soup["phase2"]
        out.append("- each component has its own mixing factors; search: optimizer "
                   f"{soup['optimizer']}, {soup['num_workers']} candidates per step (W), "
                   f"{soup['max_func_evals_per_dim']} evaluations per dimension, tau {soup['tau']}, "
                   f"bounds delta {soup['bounds_delta']}, seed {soup['seed']}"
                   + ("" if name == "mmms_phase1" else "; phase 2 " + (
                       f"over [{phase2['bounds'][0]}, {phase2['bounds'][1]}], {phase2['evals_per_dim']} "
                       f"evaluations per dimension: {report.get('phase2_decision', '')}" if phase2["enabled"]
                       else "off")))
    own = report.get(name)  # the method's own record in report.json (wise_ft, lines, model_stock)
    if isinstance(own, Mapping):
        facts = [f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in own.items()
                 if not isinstance(v, Mapping)]
        if facts:
            out.append(f"- {name}: " + "; ".join(facts))
    return out


def card_file(report: Mapping, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """``{"fused/README.md": card}`` for the ``fused/`` files of ``fused_files``."""
    from ..model.factory import CONFIG_FILE

    preprocess = json.loads(files[f"{FUSED_DIR}/{CONFIG_FILE}"])["preprocess_cfg"]
    class_names = json.loads(files[f"{FUSED_DIR}/{CLASSNAMES_FILE}"])
    return {f"{FUSED_DIR}/{CARD_FILE}": model_card(report, preprocess, class_names).encode()}


def publish_run(cfg: Config, run_id: str, files: dict[str, bytes], report: Mapping | None = None) -> str:
    """Write ``files`` under soup/<run-id>/, verify them, write MANIFEST.json, then move LATEST.
    ``report`` (report.json's content): also write the model card ``fused/README.md`` from it.
    On any failure the run directory is removed and LATEST is untouched."""
    if report is not None:
        files = {**files, **card_file(report, files)}
    dest = run_uri(cfg, run_id)
    if storage.exists(dest):
        raise storage.StorageError(f"{dest!r} exists already: a run-id is never reused")
    try:
        # the pointer moves only once the whole directory is verified and has its manifest
        storage.publish(files, dest, layout.latest_pointer(cfg), run_id)
    except BaseException:
        _remove_quietly(dest)
        raise
    return dest


def _remove_quietly(uri: str) -> None:
    try:
        storage.delete(uri)
    except Exception:  # cleaning up after a failure must not hide the failure itself
        pass


def latest_run(cfg: Config) -> str | None:
    return storage.read_pointer(layout.latest_pointer(cfg))


def read_report(cfg: Config, run_id: str | None = None) -> dict | None:
    """report.json of a run (default: the one LATEST names), or None when there is none."""
    run_id = run_id or latest_run(cfg)
    if run_id is None:
        return None
    return storage.read_json(storage.join(run_uri(cfg, run_id), "report.json"))
