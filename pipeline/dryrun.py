"""`frankensoup run --dry-run`: check the config, that every URI is reachable (and output_uri
writable), that the cluster has the resources the config asks for, and print the plan — the
number of evaluations and the memory per evaluator — before anyone pays for GPUs."""
from __future__ import annotations

import math
import uuid

from . import layout, storage
from .config import Config, redact


class Checks:
    def __init__(self, log):
        self.log = log
        self.failed = 0

    def ok(self, what: str) -> None:
        self.log(f"  ok    {what}")

    def warn(self, what: str) -> None:
        self.log(f"  warn  {what}")

    def fail(self, what: str) -> None:
        self.failed += 1
        self.log(f"  FAIL  {what}")


def check_output_writable(cfg: Config, c: Checks) -> None:
    probe = storage.join(cfg.output_uri, f".frankensoup-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"probe")
        if storage.read_bytes(probe) != b"probe":
            raise storage.StorageError(f"{probe!r} read back differently")
        storage.delete(probe)
        c.ok(f"output_uri {cfg.output_uri} is writable")
    except Exception as e:  # every failure here is the URI's; say which and why
        c.fail(f"output_uri {cfg.output_uri} is not writable: {e}")


def check_splits(cfg: Config, c: Checks) -> dict[str, dict]:
    """split name -> dataset.json of each readable split."""
    from .data.shards import split_info

    infos = {}
    made_by_prepare = cfg.data.source == "demo"
    for name, split in layout.splits(cfg).items():
        try:
            infos[name] = split_info(split.uri)
            c.ok(f"split {name} ({split.role}) readable at {split.uri}: {infos[name]['num_rows']} rows")
        except Exception as e:
            if made_by_prepare and split.uri.startswith(layout.data_root(cfg)):
                c.ok(f"split {name} ({split.role}) will be made by prepare")
            else:
                c.fail(f"split {name} ({split.role}) at {split.uri}: {e}")
    return infos


def check_classes(cfg: Config, infos: dict[str, dict], c: Checks) -> None:
    """The model's classes (the train split's) have prompt names, and every readable split can be
    scored against them: its classes, class_subset, class_map or ObjectNet mappings."""
    from .data.imagenet import prompt_names
    from .scoring import split_scoring

    train = next((n for n, s in layout.splits(cfg).items() if s.role == "train"), None)
    if train not in infos:
        return
    model_classes = infos[train]["class_names"]
    try:
        prompt_names(model_classes, cfg.model.prompt_names)
        c.ok(f"{len(model_classes)} classes, each with a prompt name")
    except Exception as e:
        c.fail(str(e))
    for name, split in layout.splits(cfg).items():
        if name in infos and split.role in ("val", "id_test", "ood"):
            try:
                split_scoring(name, split, infos[name]["class_names"], model_classes)
            except Exception as e:
                c.fail(str(e))
            else:
                if split.class_subset or split.class_map or split.objectnet_mappings:
                    c.ok(f"split {name}: classes scored through its class subset/map")


def check_pretrained(cfg: Config, c: Checks) -> None:
    p = cfg.model.pretrained
    if p == "demo":
        c.ok("model.pretrained=demo: prepare trains the base model offline")
    elif "/" in p or "://" in p or p.endswith((".safetensors", ".pt", ".pth", ".bin")):
        if storage.exists(p):
            c.ok(f"model.pretrained {p} reachable")
        else:
            c.fail(f"model.pretrained {p} does not exist or is unreachable")
    else:
        c.ok(f"model.pretrained={p}: an open_clip pretrained tag (downloaded by open_clip on first use)")


def _requests(cfg: Config) -> dict[str, tuple[dict[str, float], int]]:
    """What each kind of work asks of a node, and how many of it run at once."""
    return {
        "finetune trial": (cfg.finetune.resources.model_dump(), cfg.finetune.max_concurrent),
        "evaluate actor": (cfg.evaluate.resources.model_dump(), cfg.evaluate.num_actors),
        "soup evaluator": (cfg.soup.evaluator_resources.model_dump(), cfg.soup.num_evaluators),
    }


def worker_plan(cfg: Config, c: Checks) -> None:
    """With an autoscaler: for each stage, the worker type of the cluster YAML that fits its
    requests (the one with the fewest resources) and how many such nodes its concurrency needs."""
    import yaml

    try:
        with open(cfg.ray.cluster_yaml) as f:
            types = (yaml.safe_load(f) or {}).get("available_node_types") or {}
    except OSError as e:
        c.warn(f"ray.cluster_yaml {cfg.ray.cluster_yaml!r} unreadable ({e}): cannot say which workers are needed")
        return
    for what, (req, at_once) in _requests(cfg).items():
        fitting = sorted(((t.get("resources") or {}, name, t.get("max_workers", 0)) for name, t in types.items()
                          if (t.get("resources") or {}).get("CPU", 0) >= req["cpu"]
                          and (t.get("resources") or {}).get("GPU", 0) >= req["gpu"]),
                         key=lambda x: (x[0].get("GPU", 0), x[0].get("CPU", 0)))
        if not fitting:
            c.fail(f"{what} asks for {req['cpu']:g} CPU, {req['gpu']:g} GPU: no worker type of {cfg.ray.cluster_yaml} has it")
            continue
        res, name, most = fitting[0]
        per_node = min(int(res.get("CPU", 0) // req["cpu"]) if req["cpu"] else 10**6,
                       int(res.get("GPU", 0) // req["gpu"]) if req["gpu"] else 10**6)
        need = math.ceil(at_once / max(per_node, 1))
        text = f"{what}s: up to {need} x {name} ({at_once} at once, {per_node} per node)"
        (c.ok if need <= most else c.warn)(text + ("" if need <= most else f"; its max_workers is {most}"))


def check_cluster(cfg: Config, c: Checks) -> None:
    from .raycluster import connect

    try:
        ray = connect(cfg.ray.address, cfg.ray.num_cpus)
    except Exception as e:
        c.fail(f"cannot connect to Ray ({redact(cfg.ray.address or 'auto')}): {redact(str(e))}")
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    c.ok(f"Ray cluster: {len(nodes)} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU")
    from .raycluster import storage_problem

    problem = storage_problem(cfg, len(nodes))
    if problem:
        c.fail(problem)
    elif len(nodes) > 1 or cfg.ray.autoscaling:
        c.ok(f"output_uri {cfg.output_uri} is visible to every node "
             f"({'object storage' if storage.is_remote(cfg.output_uri) else 'storage.shared'})")
    if cfg.ray.autoscaling:
        worker_plan(cfg, c)
    for what, (req, at_once) in _requests(cfg).items():
        what = f"{what} (x{at_once} at once)"
        fits = any(n.get("CPU", 0) >= req["cpu"] and n.get("GPU", 0) >= req["gpu"] for n in nodes)
        text = f"{what} asks for {req['cpu']:g} CPU, {req['gpu']:g} GPU"
        if fits:
            c.ok(text + ": fits a node now")
        elif cfg.ray.autoscaling:
            c.warn(text + ": no node has it now; the autoscaler must add one")
        else:
            c.fail(text + ": no node of this cluster has it (set ray.autoscaling=true if an autoscaler adds nodes)")


def evaluation_budget(cfg: Config, n_ingredients: int, n_components: int) -> dict[str, int]:
    """Upper bounds on mixture evaluations per enabled soup method (phase 1 stops early on skipped
    candidates)."""
    from .soup.methods import enabled_methods

    return {m.name: m.budget(cfg.soup, n_ingredients, n_components) for m in enabled_methods(cfg.soup)}


def _trials_to_train(cfg: Config) -> str:
    """", N to train" when the base and registry are there to say which trials are reused."""
    try:
        from .finetune.sweep import reusable, trial_plan
        from .ingredients import read_registry

        rows = {r["id"]: r for r in read_registry(cfg)["ingredients"]}
        todo = [t for t in trial_plan(cfg) if not reusable(cfg, rows.get(t["id"]), t["key"])]
        probe = ""
        if cfg.finetune.init == "linear_probe" and todo:
            from .finetune.linear_probe import current_record

            probe = "; the linear probe reused" if current_record(cfg) else "; the linear probe trained first"
        return f"; {len(todo)} to train, {cfg.finetune.num_trials - len(todo)} reused{probe}"
    except Exception:  # nothing prepared or trained yet: every trial will train
        return ""


def plan(cfg: Config, rows: dict[str, int], log) -> bool:
    import torch

    from .evaluate.evaluator import EvaluatorMemoryError, required_bytes, row_bytes, working_set_rows
    from .mixture import shard_bounds
    from .soup.mmms import expected_evaluations
    from .ingredients import read_registry, usable
    from .model.classifier import init_classifier
    from .model.components import components
    from .model.factory import model_config

    n_classes = 10
    try:
        from .prepared import class_names

        n_classes = len(class_names(cfg))
    except Exception:
        pass
    clf = init_classifier(cfg.model.name, n_classes)
    n_params = sum(p.numel() for p in clf.parameters())
    comps = components(clf, cfg.soup.granularity)
    K = cfg.finetune.num_trials
    if storage.exists(layout.registry_uri(cfg)):
        K = len(usable(read_registry(cfg)))
    size = model_config(cfg.model.name)["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    _, val = layout.split_of_role(cfg, "val")
    n_val = rows.get(next(n for n, s in layout.splits(cfg).items() if s.uri == val.uri), 0)
    ev = cfg.evaluate
    try:
        resident = working_set_rows(max(K, 1), n_params, ev.ingredient_dtype, ev.working_set_gb)
    except EvaluatorMemoryError as e:
        log(f"  FAIL  {e}")
        return False
    val_bytes = n_val * 3 * size * size  # uint8 after resize and crop, normalised per batch
    need = required_bytes(resident, n_params, ev.ingredient_dtype, None) + val_bytes
    budget = evaluation_budget(cfg, K, len(comps))
    S, E = cfg.soup.val_shards, cfg.soup.num_evaluators
    shards = shard_bounds(n_val, ev.batch_size, S) if n_val else []
    log("plan:")
    for stage in layout.STAGES:
        marker = layout.read_marker(cfg, stage)
        log(f"  {stage:<9} " + (f"last finished {marker['finished']}; work whose inputs are unchanged is reused"
                                if marker else "never run here"))
    log(f"  finetune  {cfg.finetune.num_trials} trials, {cfg.finetune.max_concurrent} at once"
        + _trials_to_train(cfg))
    log(f"  model     {cfg.model.name}: {n_params / 1e6:.2f}M classifier parameters, "
        f"{len(comps)} components at granularity {cfg.soup.granularity}")
    log(f"  soup      K={K} ingredients, W={cfg.soup.num_workers} asks in flight, "
        f"E={cfg.soup.num_evaluators} evaluators, optimizer {cfg.soup.optimizer}")
    total = sum(budget.values())
    log("  evaluations (upper bounds): " + ", ".join(f"{k} {v}" for k, v in budget.items()) + f"; total {total}")
    log(f"  rounds of W: about {math.ceil(total / cfg.soup.num_workers)}")
    expected = 1 + expected_evaluations([], max(K - 1, 0), len(comps), cfg.soup)
    log(f"  plan: S={len(shards) or S} val shards of whole batches per evaluation x E={E} evaluators; phase 1 "
        f"expects about {expected:.0f} evaluations (the reference's outcome rates), at most "
        f"{budget.get('mmms_phase1', 0)}; the sequential search's next evaluation gets all E first")
    per_shard = max((b - a for a, b in shards), default=0) * 3 * size * size
    log(f"  memory per evaluator: {need / 2**30:.2f} GiB at most: working set {resident} of {K} rows x "
        f"{row_bytes(n_params, ev.ingredient_dtype) / 2**20:.1f} MiB ({ev.ingredient_dtype}"
        + (f", evaluate.working_set_gb={ev.working_set_gb:g}" if ev.working_set_gb is not None else ", no budget")
        + f") + val {n_val} images at {size}px in uint8 ({val_bytes / 2**20:.1f} MiB if it serves every shard; "
        f"{per_shard / 2**20:.1f} MiB per shard held)")
    if cfg.evaluate.memory_limit_gb is not None and need > cfg.evaluate.memory_limit_gb * 2**30:
        log(f"  FAIL  that exceeds evaluate.memory_limit_gb={cfg.evaluate.memory_limit_gb}")
        return False
    return True


def dry_run(cfg: Config, log=print) -> bool:
    log(f"dry run: output_uri={redact(cfg.output_uri)}")
    c = Checks(log)
    c.ok("config valid")
    check_output_writable(cfg, c)
    infos = check_splits(cfg, c)
    check_classes(cfg, infos, c)
    rows = {name: info["num_rows"] for name, info in infos.items()}
    check_pretrained(cfg, c)
    check_cluster(cfg, c)
    if c.failed == 0 and not plan(cfg, rows, log):
        c.failed += 1
    log(f"dry run: {'ready' if c.failed == 0 else f'{c.failed} problem(s) found'}")
    return c.failed == 0
