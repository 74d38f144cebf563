"""The soup stage: baselines and manifold mixing soup over the finetuned ingredients, searched
on val through a pool of Ray evaluator actors (every evaluation kept in the content-keyed search
memo, so no mixture is scored twice), every method's fused model scored on val, id_test and the
ood sets (scores memoised by the fused checkpoint's sha256), and the result published atomically.

Reads: finetune/ingredients.json, the ingredient checkpoints, evaluate/memo.json, the shards,
the base CLIP. Writes: soup/memo/<context>/, soup/scores.json, soup/<run-id>/, soup/LATEST,
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
from ..evaluate.mixture import Threshold
from ..keys import digest, result_settings
from .dispatch import Dispatcher, dispatcher_of
from .memo import Memo, content_key, mixture_content
from .search import evaluator_pool

Log = Callable[[str], None]


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


def read_evaluations(cfg: Config, ingredients: Sequence[Ingredient]) -> dict[str, dict[str, dict]]:
    """{model: {split: {"accuracy", "correct", "n", "role"}}} of the zero-shot head and every
    ingredient, looked up in the evaluate stage's memo by content key: a score of another
    checkpoint or another split content is never used."""
    from ..evaluate.scores import ScoreMemo, score_keys
    from ..evaluate.stage import ZERO_SHOT, splits_to_score
    from ..prepare import zero_shot_record

    memo = ScoreMemo(layout.evaluate_memo_uri(cfg))
    splits = splits_to_score(cfg)
    shas = {ZERO_SHOT: zero_shot_record(cfg)["sha256"], **{i.id: i.sha256 for i in ingredients}}
    keys = score_keys(cfg, shas, splits)
    out: dict[str, dict[str, dict]] = {}
    for s, split in splits.items():
        for m in shas:
            if keys[m, s] not in memo:
                raise SoupInputError(f"no current score of {m!r} on split {s!r} (its checkpoint or the split "
                                     "changed, or it is new): run `frankensoup evaluate` first")
            out.setdefault(m, {})[s] = {**memo[keys[m, s]], "role": split.role}
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
    from safetensors.torch import load

    try:
        weights.check_finite(load(data), where)
    except ValueError as e:
        raise SoupInputError(str(e)) from None


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
    """The earlier stages' outputs, every ingredient checked before anything is evaluated."""
    from ..finetune.registry import read_registry
    from ..prepare import load_zero_shot

    ingredients = usable_ingredients(read_registry(cfg))
    reference, meta = load_zero_shot(cfg)
    ref_state = reference.state_dict()
    for ing in ingredients:
        check_ingredient(ing, ref_state, meta["model_name"], list(meta["class_names"]))
    evaluations = read_evaluations(cfg, ingredients)
    return SoupInputs(ingredients, evaluations, reference, meta, model_components(reference, cfg.soup.granularity))


# ---- keys: the search memo's context and the soup's own key ---------------------------------

def memo_context(cfg: Config, components, val_name: str) -> dict:
    """What a val accuracy depends on besides the mixture: the val split's content and scoring,
    the model, the component layout (names and tensors) and the evaluator's precision."""
    from ..data.shards import split_content

    val = layout.splits(cfg)[val_name]
    return {"format": "frankensoup-search-memo-v1", "model": cfg.model.name,
            "ingredient_dtype": cfg.evaluate.ingredient_dtype,
            "components": [[c.name, sorted(c.params), sorted(getattr(c, "buffers", ()))] for c in components],
            "val": {"content": split_content(val.uri), "class_subset": val.class_subset, "class_map": val.class_map,
                    "objectnet_mappings": val.objectnet_mappings}}


def soup_key(cfg: Config, inputs: SoupInputs) -> str:
    """Everything the published result depends on: the memo context, the ingredients' contents,
    the scores that order them and fill the report, the soup settings, the scored splits."""
    from ..data.shards import split_content

    val, id_test, ood = _split_names(cfg)
    splits = layout.splits(cfg)
    return digest({"context": memo_context(cfg, inputs.components, val),
                   "ingredients": [[i.id, i.sha256] for i in inputs.ingredients],
                   "scores": inputs.evaluations, "soup": result_settings(cfg.soup),
                   "base": cfg.model.model_dump(mode="json"),
                   "splits": {s: [splits[s].role, split_content(splits[s].uri)] for s in (val, id_test, *ood)}})


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
                scratch_uri: str, split_names: Sequence[str]) -> tuple[dict[str, dict[str, dict]], int, int]:
    """({method: {split: {"accuracy", "correct", "n"}}}, reused, computed) of fused classifiers,
    scored like every other model (the evaluate stage's Ray Data scoring) from checkpoints under
    ``scratch_uri``. Scores are memoised by the fused weights' content hash and the split's
    content, so an added ood set scores only that set, and an unchanged soup nothing."""
    from ..evaluate.scores import ScoreMemo, score_with_memo

    models = {}
    for name, state in fused.items():
        clf = clf_lib.classifier_from_state(model_name, state, len(class_names), source=f"fused {name}")
        uri = storage.join(scratch_uri, f"{name}.safetensors")
        weights.save_classifier(uri, clf, model_name=model_name, class_names=class_names,
                                preprocess=preprocess, extra={"source": "soup"})
        models[name] = (uri, weights.tensors_sha256(state))  # the weights' content, not the file's bytes
    splits = layout.splits(cfg)
    memo = ScoreMemo(layout.fused_scores_uri(cfg))
    by_split, reused, computed = score_with_memo(cfg, memo, models, {s: splits[s] for s in split_names}, class_names)
    return {name: {s: by_split[s][name] for s in split_names} for name in fused}, reused, computed


# ---- the stage ------------------------------------------------------------------------------

def _split_names(cfg: Config) -> tuple[str, str, list[str]]:
    val, _ = layout.split_of_role(cfg, "val")
    id_test, _ = layout.split_of_role(cfg, "id_test")
    return val, id_test, list(layout.ood_splits(cfg))


def build_report(cfg: Config, run_id: str, ids: Sequence[str], component_names: Sequence[str],
                 result: SearchResult, scores: dict, evaluations: dict, timings: dict, counts: dict,
                 key: str) -> dict:
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
        "evaluations": counts,
        "soup_key": key,
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


class LazyPool:
    """The evaluator pool, started at the first mixture the memo cannot answer: a soup whose
    every evaluation is in the memo starts no actor at all. Synchronous ``pool(betas)`` and the
    asynchronous side the speculative phase 1 uses (``free``, ``submit``, ``wait``)."""

    parallel = True

    def __init__(self, cfg: Config, val: str, ids: list[str], component_names: list[str], metrics):
        self.cfg, self.val, self.ids, self.names, self.metrics = cfg, val, ids, component_names, metrics
        self.pool = None

    @property
    def size(self) -> int:
        return self.cfg.soup.num_evaluators

    def started(self):
        if self.pool is None:
            self.pool = evaluator_pool(self.cfg, self.val, self.ids)
            _check_pool(self.pool.wait_ready(), self.ids, self.names)
        return self.pool

    def __call__(self, betas: list[np.ndarray]) -> list[float]:
        return self.started()(betas)

    def free(self) -> int:
        return self.started().free()

    def submit(self, beta, threshold=None) -> int:
        return self.started().submit(beta, threshold)

    def wait(self) -> list:
        return self.started().wait()

    @property
    def seconds(self) -> float:
        return self.pool.seconds if self.pool is not None else 0.0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()  # the actors' CPUs/GPUs go to the scoring that follows


class _ContentMemo:
    """The search memo as the Dispatcher's memo: mixtures keyed by content, with their accuracy
    or the threshold tests they failed (an early stop is a fact too: a rerun makes the same
    decision without scoring). Written in batches (one part file per ``FLUSH_EVERY`` answers,
    and at the end), not one small object per evaluation; a crash loses at most the last batch."""

    FLUSH_EVERY = 32

    def __init__(self, memo: Memo, shas: Sequence[str]):
        self.memo, self.shas = memo, list(shas)
        self.pending: dict[str, tuple[list, float]] = {}
        self.pending_failed: list[tuple[str, list, tuple[float, bool]]] = []

    def _content(self, beta: np.ndarray) -> tuple[str, list]:
        content = mixture_content(beta, self.shas)
        return content_key(content), content

    def get(self, beta: np.ndarray) -> float | None:
        key, _ = self._content(beta)
        hit = self.pending.get(key)
        return hit[1] if hit is not None else self.memo.get(key)

    def put(self, beta: np.ndarray, accuracy: float) -> None:
        key, content = self._content(beta)
        self.pending[key] = (content, accuracy)
        self._maybe_flush()

    def failed(self, beta: np.ndarray) -> list[Threshold]:
        key, _ = self._content(beta)
        known = self.memo.failed(key) + [t for k, _, t in self.pending_failed if k == key]
        return [Threshold(value, strict) for value, strict in known]

    def put_failed(self, beta: np.ndarray, threshold: Threshold) -> None:
        key, content = self._content(beta)
        self.pending_failed.append((key, content, (threshold.value, threshold.strict)))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self.pending) + len(self.pending_failed) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending or self.pending_failed:
            contents = [c for c, _ in self.pending.values()]
            accs = [a for _, a in self.pending.values()]
            self.memo.append(contents, accs, [(c, t) for _, c, t in self.pending_failed])
            self.pending, self.pending_failed = {}, []


def search_on_ray(cfg: Config, inputs: SoupInputs, run_id: str, log: Log) -> tuple[SearchResult, dict]:
    """The search, every evaluation answered from the memo or spread over E evaluator actors."""
    val, _, _ = _split_names(cfg)
    ids, names = inputs.ids, inputs.component_names
    memo = Memo.open(layout.soup_memo_root(cfg), memo_context(cfg, inputs.components, val))
    val_accs = [float(inputs.evaluations[i][val]["accuracy"]) for i in ids]
    metrics = dashboard_metrics(run_id)
    pool = LazyPool(cfg, val, ids, names, metrics)
    # phase 1 speculates on the pool's idle actors; the memo answers what it holds
    content_memo = _ContentMemo(memo, [i.sha256 for i in inputs.ingredients])
    evaluate = Dispatcher(pool, memo=content_memo)
    try:
        result = run_search(cfg, evaluate, val_accs, len(names), ProgressPrinter(ids, log, metrics), log)
    finally:
        content_memo.flush()  # what was evaluated is kept, even when the search failed
        pool.close()
        if metrics is not None:
            metrics.close()
    hits, misses = evaluate.cost.memo_hits, evaluate.cost.evaluations
    log(f"soup: {hits} mixtures from memo, {misses} evaluated")
    counts = {"memo": layout.relative(cfg, memo.uri), "from_memo": hits, "evaluated": misses,
              "evaluator_nodes": [i["node_id"] for i in pool.pool.infos] if pool.pool is not None else [],
              "phase1": result.phase1.n_evals, "phase2": result.phase2.n_evals if result.phase2 else 0,
              "evaluator_seconds": round(pool.seconds, 2)}
    return result, counts


def run_soup(cfg: Config, force: bool = False, log: Log = print, show_table: bool = True) -> dict:
    """Baselines + MMMS on the ingredients and their scores; publishes soup/<run-id>/ and moves
    soup/LATEST. Returns report.json's content. When the published run was made from exactly
    these inputs (its soup key) nothing is redone, unless ``force``; otherwise every mixture
    and score already in a memo is reused. Ends by printing the report's table."""
    from ..prepare import load_base_clip

    t_start = time.time()
    inputs = load_inputs(cfg)
    key = soup_key(cfg, inputs)
    done = layout.stage_done(cfg, "soup", key)
    if done and not force and storage.exists(storage.join(pub.run_uri(cfg, done["run_id"]), "report.json")):
        report = pub.read_report(cfg, done["run_id"])
        seconds = round(time.time() - t_start, 1)
        log(f"soup: inputs unchanged since run {done['run_id']}: reused ({seconds}s)")
        layout.mark_done(cfg, "soup", key, {**{k: done[k] for k in ("run_id", "run_uri", "mmms_val")},
                                            "reused": 0, "computed": 0, "unit": "mixtures", "scores_reused": 0,
                                            "scores_computed": 0, "seconds": seconds})
        if show_table:
            log(rep.markdown_table(report))
        return report
    if force:
        storage.delete(layout.soup_memo_root(cfg))
        storage.delete(layout.fused_scores_uri(cfg))
    from ..raycluster import init_ray

    init_ray(cfg)  # `frankensoup soup` alone starts or joins Ray like `run` does
    ids, meta = inputs.ids, inputs.meta
    log(f"soup: {len(ids)} ingredients x {len(inputs.components)} components "
        f"({', '.join(inputs.component_names)}), {cfg.soup.num_evaluators} evaluators, "
        f"W = {cfg.soup.num_workers}, optimizer {cfg.soup.optimizer}")
    run_id = pub.make_run_id(key)
    layout.clear_done(cfg, "soup")

    t0 = time.time()
    result, counts = search_on_ray(cfg, inputs, run_id, log)
    timings = {**result.timings, "search": time.time() - t0}

    t0 = time.time()
    val, id_test, ood = _split_names(cfg)
    fused = fuse_methods(result.betas, inputs.ingredients, inputs.components)
    # the fused classifiers are scored from files every scoring actor can read
    scratch = storage.join(layout.soup_root(cfg), f"scratch-{run_id}")
    try:
        scores, scores_reused, scores_made = score_fused(cfg, fused, meta["model_name"], list(meta["class_names"]),
                                                         meta["preprocess"], scratch, [val, id_test, *ood])
    finally:
        storage.delete(scratch)
    counts.update(scores_reused=scores_reused, scores_computed=scores_made)
    log(f"soup: fused-model scores: {scores_reused} reused, {scores_made} scored")
    timings["scoring"] = time.time() - t0
    _note_if_val_moved(result, scores, val, log)

    t0 = time.time()
    base_clip, _ = load_base_clip(cfg)
    files = pub.fused_files(base_clip, meta["model_name"], meta["preprocess"], fused["mmms"],
                            list(meta["class_names"]))
    timings["total"] = time.time() - t_start
    report = build_report(cfg, run_id, ids, inputs.component_names, result, scores, inputs.evaluations,
                          timings, counts, key)
    files.update(report_files(report))
    dest = pub.publish_run(cfg, run_id, files, report=report)  # with the report: fused/README.md, the model card
    seconds = round(time.time() - t_start, 1)
    layout.mark_done(cfg, "soup", key, {"run_id": run_id, "run_uri": layout.relative(cfg, dest),
                                        "mmms_val": report["methods"]["mmms"]["val"],
                                        "reused": counts["from_memo"], "computed": counts["evaluated"],
                                        "unit": "mixtures", "scores_reused": scores_reused,
                                        "scores_computed": scores_made, "seconds": seconds})
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
