"""The soup stage: baselines and manifold mixing soup over the finetuned ingredients, searched
on val through a pool of Ray evaluator actors (journaled, so a rerun resumes), every method's
fused model scored on val, id_test and the ood sets, and the result published atomically.

Reads: finetune/ingredients.json, the ingredient checkpoints, evaluate/results.parquet,
the shards, the base CLIP. Writes: soup/journal/<key>/, soup/<run-id>/, soup/LATEST,
soup/_DONE.json (docs/outputs.md)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import layout, storage
from ..config import Config
from ..errors import UserError
from ..model import classifier as clf_lib
from ..model import weights
from ..model.components import components as model_components
from . import baselines, mixture, mmms
from . import publish as pub
from . import report as rep
from .dispatch import Dispatcher, dispatcher_of
from .journal import Journal
from .search import evaluator_pool

Log = Callable[[str], None]
# config fields that change how fast the soup runs, never what it finds (so never in a journal header)
SPEED_ONLY = ("num_evaluators", "evaluator_resources")


class SoupInputError(UserError, ValueError):
    """Inputs the soup cannot use (missing stage, unusable ingredient); the message names them."""


# ---- inputs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ingredient:
    id: str
    uri: str
    sha256: str


def usable_ingredients(registry: dict) -> list[Ingredient]:
    """The registry's ``ok`` ingredients, by id (the row order of every beta)."""
    from ..finetune.registry import usable

    rows = usable(registry)
    if not rows:
        raise SoupInputError("finetune/ingredients.json lists no ingredient with status 'ok': nothing to mix")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SoupInputError(f"finetune/ingredients.json repeats an ingredient id: {sorted(ids)}")
    return [Ingredient(r["id"], r["checkpoint_uri"], r["sha256"]) for r in sorted(rows, key=lambda r: r["id"])]


def read_evaluations(cfg: Config) -> dict[str, dict[str, dict]]:
    """evaluate/results.parquet as {model: {split: {"accuracy", "correct", "n", "role"}}}."""
    from ..evaluate.stage import read_results

    out: dict[str, dict[str, dict]] = {}
    for row in read_results(cfg):
        out.setdefault(row["model"], {})[row["split"]] = {k: row[k] for k in ("accuracy", "correct", "n", "role")}
    return out


def _safetensors_header(data: bytes, uri: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    try:
        header = storage.safetensors_header(data)
        meta = header.pop("__metadata__", None) or {}
        return {k: tuple(v["shape"]) for k, v in header.items()}, meta
    except (ValueError, KeyError, TypeError) as e:
        raise SoupInputError(f"ingredient checkpoint {uri!r} is not a safetensors file: {e}") from None


def check_ingredient(ing: Ingredient, reference: dict[str, torch.Tensor], model_name: str,
                     class_names: list[str]) -> None:
    """Refuse, naming the ingredient and file, a checkpoint that is not the registered one or
    does not have the architecture and classes of the run's model."""
    data = storage.read_bytes(ing.uri)
    where = f"ingredient {ing.id!r} ({ing.uri})"
    if storage.sha256(data) != ing.sha256:
        raise SoupInputError(f"{where}: sha256 differs from finetune/ingredients.json "
                             "(the file changed after it was registered)")
    shapes, meta = _safetensors_header(data, ing.uri)
    if meta.get("model_name") not in (None, model_name):
        raise SoupInputError(f"{where} is a {meta['model_name']!r} model, this run mixes {model_name!r}")
    missing = sorted(set(reference) - set(shapes))
    extra = sorted(set(shapes) - set(reference))
    wrong = [k for k in reference if k in shapes and shapes[k] != tuple(reference[k].shape)]
    if missing or extra or wrong:
        if wrong:
            detail = f"{wrong[0]} has shape {shapes[wrong[0]]}, the model's is {tuple(reference[wrong[0]].shape)}"
        else:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise SoupInputError(f"{where} does not have the architecture of {model_name!r}: {detail}")
    if "class_names" in meta and json.loads(meta["class_names"]) != class_names:
        raise SoupInputError(f"{where} was trained for other classes than this run's")


def load_state(uri: str) -> dict[str, torch.Tensor]:
    tensors, _ = weights.read_checkpoint(uri)
    return tensors


@dataclass
class SoupInputs:
    ingredients: list[Ingredient]   # beta row order
    evaluations: dict                # evaluate/results.parquet by model and split
    reference: torch.nn.Module       # the zero-shot classifier: architecture and components
    meta: dict                       # its metadata: model_name, class_names, preprocess
    components: list                 # beta column order

    @property
    def ids(self) -> list[str]:
        return [i.id for i in self.ingredients]

    @property
    def component_names(self) -> list[str]:
        return [c.name for c in self.components]


def load_inputs(cfg: Config) -> SoupInputs:
    """The finished stages' outputs, every ingredient checked before anything is evaluated."""
    from ..evaluate.stage import ZERO_SHOT
    from ..finetune.registry import read_registry
    from ..prepare import load_zero_shot

    _require_done(cfg, "evaluate", "evaluate")
    ingredients = usable_ingredients(read_registry(cfg))
    reference, meta = load_zero_shot(cfg)
    ref_state = reference.state_dict()
    for ing in ingredients:
        check_ingredient(ing, ref_state, meta["model_name"], list(meta["class_names"]))
    evaluations = read_evaluations(cfg)
    val, _, _ = _split_names(cfg)
    missing = [m for m in [ZERO_SHOT, *(i.id for i in ingredients)] if val not in evaluations.get(m, {})]
    if missing:
        raise SoupInputError(f"evaluate/results.parquet has no val accuracy for {missing}: "
                             "rerun `frankensoup evaluate`")
    return SoupInputs(ingredients, evaluations, reference, meta, model_components(reference, cfg.soup.granularity))


# ---- the journal ----------------------------------------------------------------------------

def split_identity(split_uri: str) -> dict:
    """What the val accuracies depend on in the data: its dataset.json and shard sizes
    (not its URI, so a copied output keeps its journal)."""
    from ..data import shards

    info_bytes = storage.read_bytes(storage.join(split_uri, "dataset.json"))
    files = shards.shard_uris(split_uri)
    sizes = [storage.resolve(f).fs.get_file_info(storage.resolve(f).path).size for f in files]
    return {"dataset_json_sha256": storage.sha256(info_bytes), "shard_sizes": sizes}


def journal_header(cfg: Config, ingredients: Sequence[Ingredient], component_names: Sequence[str],
                   val_name: str, val_uri: str) -> dict:
    soup = {k: v for k, v in cfg.soup.model_dump(mode="json").items() if k not in SPEED_ONLY}
    return {"format": "frankensoup-soup-journal-v1", "soup": soup, "model": cfg.model.name,
            "ingredient_dtype": cfg.evaluate.ingredient_dtype, "components": list(component_names),
            "ingredients": [[i.id, i.sha256] for i in ingredients],
            "val": {"name": val_name, **split_identity(val_uri)}}


# ---- progress -------------------------------------------------------------------------------

def dashboard_metrics(run: str):
    """Ray dashboard metrics when Ray's metrics are available; None otherwise."""
    try:
        from ..metrics import RunMetrics

        return RunMetrics(run)
    except Exception:  # no Ray connection or metrics agent: the run goes on without a dashboard
        return None


class ProgressPrinter:
    """The core's progress dict -> one line per new ingredient/step, and at most every
    ``every_s`` seconds in between; also feeds the dashboard metrics."""

    def __init__(self, ids: Sequence[str], log: Log, metrics=None, every_s: float = 10.0):
        self.ids, self.log, self.metrics, self.every_s = list(ids), log, metrics, every_s
        self._last_where = None
        self._last_time = 0.0

    def __call__(self, p: dict) -> None:
        if self.metrics is not None:
            self.metrics.on_batch(p["batch"], p["best_val"], p["seconds"])
        where = (p["phase"], p.get("ingredient"), p.get("step"))
        now = time.time()
        if where == self._last_where and now - self._last_time < self.every_s:
            return
        self._last_where, self._last_time = where, now
        ing = p.get("ingredient")
        name = "all chosen" if ing is None else self.ids[ing]
        expected = p.get("expected", p["budget"])
        extra = f", {p['dropped']} speculative dropped" if p.get("dropped") else ""
        self.log(f"soup phase {p['phase']} | ingredient {name} ({p.get('step')}) | "
                 f"evaluations {p['evals']} of ~{expected:.0f} expected (at most {p['budget']}{extra}) | "
                 f"best val {p['best_val']:.4f}")


# ---- the search -----------------------------------------------------------------------------

@dataclass
class SearchResult:
    betas: dict[str, np.ndarray]       # method -> beta (K x C), mixtures only
    search_val: dict[str, float]       # method -> the evaluator's val accuracy
    phase1: mmms.Phase1Result
    phase2: mmms.Phase2Result | None
    phase2_kept: bool
    decision: str
    timings: dict[str, float]
    cost: dict[str, dict]  # per method/phase: what the evaluators did (dispatch.Cost.report)


def run_search(cfg: Config, evaluate, val_accs: Sequence[float], C: int, progress, log: Log) -> SearchResult:
    """Baselines and MMMS phases 1 and 2, all through ``evaluate`` (Ray-free beyond it): a plain
    callable, an asynchronous evaluator (the Ray pool: phase 1 speculates) or a Dispatcher."""
    K = len(val_accs)
    evaluate = dispatcher_of(evaluate)
    cost: dict[str, dict] = {}

    def costed(name: str, run):
        """Run one method's search; its evaluators' work goes to cost[name]."""
        before, t = evaluate.cost.copy(), time.time()
        out = run()
        cost[name] = evaluate.cost.since(before).report(time.time() - t, evaluate.size)
        return out

    betas = {"best_individual": baselines.best_individual(val_accs, C), "uniform_soup": baselines.uniform_soup(K, C)}
    accs = costed("individual_and_uniform", lambda: evaluate([betas["best_individual"], betas["uniform_soup"]]))
    search_val = {"best_individual": accs[0], "uniform_soup": accs[1]}
    log(f"soup: best individual val {accs[0]:.4f}, uniform soup val {accs[1]:.4f}")
    betas["greedy_soup"], greedy_trace = costed("greedy_soup", lambda: baselines.greedy_soup(val_accs, C, evaluate))
    search_val["greedy_soup"] = greedy_trace[-1][1]
    log(f"soup: greedy soup val {search_val['greedy_soup']:.4f} "
        f"({int(np.count_nonzero(betas['greedy_soup'].any(axis=1)))} of {K} ingredients)")

    p1 = costed("mmms_phase1", lambda: mmms.phase1(val_accs, C, evaluate, cfg.soup, progress))
    c = cost["mmms_phase1"]
    log(f"soup: mmms phase 1 val {p1.val_acc:.4f} ({p1.n_evals} evaluations, {len(p1.chosen)} ingredients mixed; "
        f"{c['evaluations']} run on {c['evaluators']} evaluators, {c['speculative_dropped']} of them dropped "
        f"speculation, {c['wall_seconds']:.1f}s)")
    betas["mmms_phase1"], search_val["mmms_phase1"] = p1.beta, p1.val_acc

    p2, kept = None, False
    if cfg.soup.phase2.enabled:
        p2 = costed("mmms_phase2", lambda: mmms.phase2(p1.beta, evaluate, cfg.soup, progress))
        kept = p2.val_acc > p1.val_acc  # phase 2 must earn its place on val
        verdict = "kept" if kept else "not better, phase 1 kept"
        decision = f"phase 2 val {p2.val_acc:.4f} vs phase 1 {p1.val_acc:.4f}: {verdict}"
    else:
        decision = "phase 2 disabled (soup.phase2.enabled=false)"
    log(f"soup: {decision}")
    betas["mmms"] = p2.beta if kept else p1.beta
    search_val["mmms"] = p2.val_acc if kept else p1.val_acc
    timings = {"baselines": cost["individual_and_uniform"]["wall_seconds"] + cost["greedy_soup"]["wall_seconds"],
               "phase1": cost["mmms_phase1"]["wall_seconds"]}
    if p2 is not None:
        timings["phase2"] = cost["mmms_phase2"]["wall_seconds"]
    return SearchResult(betas, search_val, p1, p2, kept, decision, timings, cost)


def search_trace(result: SearchResult) -> list[list[float]]:
    """(cumulative evaluations, best val so far): phase 1, then phase 2."""
    trace = [[n, acc] for n, acc in result.phase1.trace]
    if result.phase2 is not None:
        offset, best = result.phase1.n_evals, result.phase1.val_acc
        for n, acc in result.phase2.trace:
            best = max(best, acc)
            trace.append([offset + n, best])
    return trace


# ---- fusing and scoring the results ---------------------------------------------------------

def fuse_methods(betas: dict[str, np.ndarray], ingredients: Sequence[Ingredient], components) -> dict[str, dict]:
    """Each method's fused classifier state dict, with the core's reference fusion, in one pass
    that loads each ingredient a method uses once and holds one at a time."""
    used = sorted({int(j) for b in betas.values() for j in np.flatnonzero(b.any(axis=1))})
    return mixture.fuse_many(((j, load_state(ingredients[j].uri)) for j in used), betas, components)


def score_fused(cfg: Config, fused: dict[str, dict], model_name: str, class_names: list[str], preprocess: dict,
                scratch_uri: str, split_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """{method: {split: {"accuracy", "correct", "n"}}} of fused classifiers, scored like every
    other model (evaluate stage's Ray Data scoring) from checkpoints under ``scratch_uri``."""
    from ..evaluate.stream import score_splits

    uris = {}
    for name, state in fused.items():
        clf = clf_lib.classifier_from_state(model_name, state, len(class_names), source=f"fused {name}")
        uris[name] = storage.join(scratch_uri, f"{name}.safetensors")
        weights.save_classifier(uris[name], clf, model_name=model_name, class_names=class_names,
                                preprocess=preprocess, extra={"source": f"soup {name}"})
    splits = layout.splits(cfg)
    by_split = score_splits(uris, {s: splits[s] for s in split_names}, batch_size=cfg.evaluate.batch_size,
                            num_actors=cfg.evaluate.num_actors, resources=cfg.evaluate.resources,
                            class_names=class_names, threads=cfg.evaluate.threads,
                            autocast_bf16=cfg.evaluate.ingredient_dtype == "bfloat16")
    return {name: {s: by_split[s][name] for s in split_names} for name in fused}


# ---- the stage ------------------------------------------------------------------------------

def _require_done(cfg: Config, stage: str, command: str) -> None:
    if layout.stage_done(cfg, stage) is None:
        raise SoupInputError(f"the soup needs a finished {stage} stage under these settings in "
                             f"{cfg.output_uri!r}: run `frankensoup {command}` first")


def _split_names(cfg: Config) -> tuple[str, str, list[str]]:
    val, _ = layout.split_of_role(cfg, "val")
    id_test, _ = layout.split_of_role(cfg, "id_test")
    return val, id_test, list(layout.ood_splits(cfg))


def build_report(cfg: Config, run_id: str, ids: Sequence[str], component_names: Sequence[str],
                 result: SearchResult, scores: dict, evaluations: dict, timings: dict, journal_info: dict) -> dict:
    from ..evaluate.stage import ZERO_SHOT

    val, id_test, ood = _split_names(cfg)
    zs = evaluations[ZERO_SHOT]
    methods = {"zero_shot": rep.method_entry(zs[val]["accuracy"], zs[id_test]["accuracy"],
                                             {s: zs[s]["accuracy"] for s in ood}, [], [])}
    for name in ("best_individual", "uniform_soup", "greedy_soup", "mmms_phase1", "mmms"):
        s = scores[name]
        methods[name] = rep.method_entry(s[val]["accuracy"], s[id_test]["accuracy"],
                                         {o: s[o]["accuracy"] for o in ood}, ids, result.betas[name],
                                         search_val=result.search_val[name])
    sizes = {split: int(zs[split]["n"]) for split in (val, id_test, *ood)}
    return {
        "run_id": run_id,
        "methods": methods,
        "components": list(component_names),
        "config": cfg.model_dump(mode="json"),
        "versions": rep.versions(),
        "seed": cfg.soup.seed,
        "phase2_kept": result.phase2_kept,
        "phase2_decision": result.decision,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "ingredient_scores": rep.ingredient_scores(
            {m: {s: v["accuracy"] for s, v in by_split.items()} for m, by_split in evaluations.items()},
            ids, val, id_test, ood),
        "search_trace": search_trace(result),
        "phase1_decisions": [[ids[j], outcome, acc] for j, outcome, acc in result.phase1.decisions],
        "cost": result.cost,
        "splits": {"val": val, "id_test": id_test, "ood": ood},
        "split_sizes": sizes,
        "evaluations": journal_info,
        "stage_key": layout.stage_key(cfg, "soup"),
    }


def report_files(report: dict) -> dict[str, bytes]:
    files = {"report.json": json.dumps(report, indent=2, sort_keys=False).encode(),
             "report.md": rep.render_markdown(report).encode()}
    try:
        from ..report.plots import render_plots
    except ImportError:  # plots are optional (matplotlib); the numbers are the result
        return files
    files.update(render_plots(report))
    return files


def search_on_ray(cfg: Config, inputs: SoupInputs, run_id: str, log: Log) -> tuple[SearchResult, dict]:
    """The search, its evaluations journaled and spread over E evaluator actors on val."""
    val, _, _ = _split_names(cfg)
    ids, names = inputs.ids, inputs.component_names
    header = journal_header(cfg, inputs.ingredients, names, val, layout.splits(cfg)[val].uri)
    journal = Journal.open(layout.journal_root(cfg), header)
    if len(journal):
        log(f"soup: journal {journal.uri} holds {len(journal)} evaluations; they are replayed, not redone")
    val_accs = [float(inputs.evaluations[i][val]["accuracy"]) for i in ids]
    metrics = dashboard_metrics(run_id)
    pool = evaluator_pool(cfg, val, ids)
    try:
        _check_pool(pool.wait_ready(), ids, names)
        # phase 1 speculates on the pool's idle actors; the journal answers what it holds
        evaluate = Dispatcher(pool, memo=_JournalMemo(journal))
        result = run_search(cfg, evaluate, val_accs, len(names), ProgressPrinter(ids, log, metrics), log)
    finally:
        pool.close()  # the actors' CPUs/GPUs go to the scoring that follows
        if metrics is not None:
            metrics.close()
    counts = {"journal": journal.uri, "replayed": evaluate.cost.memo_hits, "evaluated": evaluate.cost.evaluations,
              "phase1": result.phase1.n_evals, "phase2": result.phase2.n_evals if result.phase2 else 0,
              "evaluator_seconds": round(pool.seconds, 2)}
    return result, counts


class _JournalMemo:
    """The journal as the Dispatcher's memo: each evaluated mixture is journaled as it comes back."""

    def __init__(self, journal: Journal):
        self.journal = journal

    def get(self, beta: np.ndarray) -> float | None:
        return self.journal.get(mixture.mixture_key(beta))

    def put(self, beta: np.ndarray, accuracy: float) -> None:
        self.journal.append([beta], [accuracy])


def run_soup(cfg: Config, force: bool = False, log: Log = print, show_table: bool = True) -> dict:
    """Baselines + MMMS on the finished evaluate stage; publishes soup/<run-id>/ and moves
    soup/LATEST. Returns report.json's content. Skipped (the published report returned) when
    done under the same settings, unless ``force``. Ends by printing the report's table."""
    from ..prepare import load_base_clip

    done = layout.stage_done(cfg, "soup")
    if done and not force:
        report = pub.read_report(cfg, done["run_id"])
        log(f"soup: already done under these settings ({done['finished']}, run {done['run_id']}), skipping")
        if show_table:
            log(rep.markdown_table(report))
        return report
    t_start = time.time()
    inputs = load_inputs(cfg)
    ids, meta = inputs.ids, inputs.meta
    log(f"soup: {len(ids)} ingredients x {len(inputs.components)} components "
        f"({', '.join(inputs.component_names)}), {cfg.soup.num_evaluators} evaluators, "
        f"W = {cfg.soup.num_workers}, optimizer {cfg.soup.optimizer}")
    run_id = pub.make_run_id(cfg)

    t0 = time.time()
    result, counts = search_on_ray(cfg, inputs, run_id, log)
    timings = {**result.timings, "search": time.time() - t0}

    t0 = time.time()
    val, id_test, ood = _split_names(cfg)
    fused = fuse_methods(result.betas, inputs.ingredients, inputs.components)
    # the fused classifiers are scored from files every scoring actor can read
    scratch = storage.join(layout.soup_root(cfg), f"scratch-{run_id}")
    try:
        scores = score_fused(cfg, fused, meta["model_name"], list(meta["class_names"]), meta["preprocess"],
                             scratch, [val, id_test, *ood])
    finally:
        storage.delete(scratch)
    timings["scoring"] = time.time() - t0
    _note_if_val_moved(result, scores, val, log)

    t0 = time.time()
    base_clip, _ = load_base_clip(cfg)
    files = pub.fused_files(base_clip, meta["model_name"], meta["preprocess"], fused["mmms"],
                            list(meta["class_names"]))
    timings["total"] = time.time() - t_start
    report = build_report(cfg, run_id, ids, inputs.component_names, result, scores, inputs.evaluations,
                          timings, counts)
    files.update(report_files(report))
    dest = pub.publish_run(cfg, run_id, files)
    layout.mark_done(cfg, "soup", {"run_id": run_id, "run_uri": dest, "mmms_val": report["methods"]["mmms"]["val"],
                                   "seconds": round(time.time() - t_start, 1)})
    log(f"soup: published {dest} ({time.time() - t0:.1f}s); LATEST -> {run_id}")
    if show_table:
        log(rep.markdown_table(report))
    return report


def _check_pool(info: dict, ids: list[str], component_names: list[str]) -> None:
    """The actors' beta rows and columns must be the ones this stage names in the report."""
    if info["ingredient_ids"] != ids or info["component_names"] != component_names:
        raise RuntimeError(f"evaluator actors mix {info['ingredient_ids']} x {info['component_names']}, "
                           f"the soup stage expected {ids} x {component_names}")


def _note_if_val_moved(result: SearchResult, scores: dict, val: str, log: Log) -> None:
    """The published model is fused tensor by tensor, the search's in one matrix product: the
    val accuracies should agree; say so plainly when rounding flipped a prediction."""
    for name, acc in result.search_val.items():
        published = scores[name][val]["accuracy"]
        if abs(published - acc) > 1e-12:
            log(f"soup: note: {name} val {published:.4f} as published vs {acc:.4f} in the search (float rounding)")
