"""The soup stage: every registered soup method (methods/: baselines, MMMS, ...) run over the
finetuned ingredients, searched on val through a pool of Ray evaluator actors (every evaluation
kept in the content-keyed search memo, so no mixture is scored twice), every method's model
scored on val, id_test and the ood sets (scores memoised by content), and the result published
atomically (the model of ``soup.publish``, mmms by default).

Reads: finetune/ingredients.json, the ingredient checkpoints, evaluate/memo.json, the shards,
the base CLIP. Writes: soup/memo/<context>/, soup/scores.json, soup/<run-id>/, soup/LATEST,
soup/_DONE.json (docs/outputs.md)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from .. import layout, storage, tracking
from ..prepared import ZERO_SHOT, load_base_clip
from ..metrics import current_run
from ..raycluster import PLACEMENT_FIELDS, init_ray
from ..config import Config, redacted
from . import publish as pub
from ..report import results as rep
from .dispatch import Dispatcher
from .fusing import ModelServices, fuse_methods, score_fused
from .inputs import SoupInputs, load_inputs, memo_context, soup_key, split_names
from .memo import ContentMemo, Memo
from .methods import SearchResult, run_methods
from .pool import LazyPool
from .progress import ProgressPrinter, dashboard_metrics

Log = Callable[[str], None]


def build_report(cfg: Config, run_id: str, ids: Sequence[str], component_names: Sequence[str],
                 result: SearchResult, scores: dict, evaluations: dict, timings: dict, counts: dict,
                 key: str) -> dict:
    val, id_test, ood = split_names(cfg)
    zs = scores[ZERO_SHOT]
    methods = {ZERO_SHOT: rep.method_entry(zs[val]["accuracy"], zs[id_test]["accuracy"],
                                           {s: zs[s]["accuracy"] for s in ood}, [], [])}
    for name, r in result.results.items():
        s = scores[name]
        methods[name] = rep.method_entry(s[val]["accuracy"], s[id_test]["accuracy"],
                                         {o: s[o]["accuracy"] for o in ood}, ids if r.beta is not None else [],
                                         r.beta if r.beta is not None else [], search_val=r.search_val)
    sizes = {split: int(zs[split]["n"]) for split in (val, id_test, *ood)}
    return {
        "run_id": run_id,
        "methods": methods,
        "components": list(component_names),
        "config": redacted(cfg),  # credentials inside URIs hidden
        "versions": rep.versions(),
        "seed": cfg.soup.seed,
        **result.report_fields(),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "ingredient_scores": rep.ingredient_scores(
            {m: {s: v["accuracy"] for s, v in by_split.items()} for m, by_split in evaluations.items()},
            ids, val, id_test, ood),
        "cost": result.cost,
        "published": cfg.soup.publish,
        "mcnemar": rep.mcnemar_tests(scores, cfg.soup.publish, list(methods), [id_test, *ood]),
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


def search_on_ray(cfg: Config, inputs: SoupInputs, run_id: str, log: Log,
                  models: ModelServices | None = None) -> tuple[SearchResult, dict]:
    """Every method's search, every mixture evaluation answered from the memo or spread over E
    evaluator actors; methods that make other models score them through ``models``."""
    val, _, _ = split_names(cfg)
    ids, names = inputs.ids, inputs.component_names
    val_accs = [float(inputs.evaluations[i][val]["accuracy"]) for i in ids]
    metrics = dashboard_metrics(current_run())  # labelled with the command's run, as every metric
    pool = LazyPool(cfg, val, ids, names, metrics)
    try:  # the memo is keyed by what the evaluators predict on the probe: they start first
        probe = pool.probe_fingerprint()
    except BaseException:
        pool.close()
        raise
    memo = Memo.open(layout.soup_memo_root(cfg), memo_context(cfg, inputs.components, val, probe))
    # phase 1 speculates on the pool's idle actors; the memo answers what it holds
    content_memo = ContentMemo(memo, [i.sha256 for i in inputs.ingredients])
    evaluate = Dispatcher(pool, memo=content_memo)
    printer = ProgressPrinter(ids, log, metrics, every_s=cfg.console.status_every_s)

    def mixtures_done() -> None:
        printer.close()
        pool.close()  # the evaluators' CPUs and GPUs go to scoring WiSE-FT's and the ensemble's models

    try:
        result = run_methods(cfg, evaluate, val_accs, len(names), printer, printer.say, ids, models,
                             mixtures_done=mixtures_done)
    finally:
        content_memo.flush()  # what was evaluated is kept, even when the search failed
        printer.close(finished=False)  # closed already when the search ended
        pool.close()
        if metrics is not None:
            metrics.close()
    # reused: answers from earlier runs' memo entries (this run's repeats are not reuse)
    hits, misses = content_memo.reused, evaluate.cost.evaluations
    log(f"soup: {hits} mixtures from memo, {misses} evaluated")
    infos = pool.pool.infos if pool.pool is not None else []  # each evaluator's placement
    counts = {"memo": layout.relative(cfg, memo.uri), "probe": probe, "from_memo": hits, "evaluated": misses,
              "evaluator_nodes": [i["node_id"] for i in infos],
              "evaluators": [{k: i.get(k) for k in PLACEMENT_FIELDS} for i in infos],
              "evaluator_seconds": round(pool.seconds, 2)}
    return result, counts


def run_soup(cfg: Config, force: bool = False, log: Log = print, show_table: bool = True) -> dict:
    """Every enabled soup method on the ingredients and their scores; publishes soup/<run-id>/
    (fused/ is the model of ``soup.publish``) and moves
    soup/LATEST. Returns report.json's content. When the published run was made from exactly
    these inputs (its soup key) nothing is redone, unless ``force``; otherwise every mixture
    and score already in a memo is reused. Ends by printing the report's table."""
    t_start = time.time()
    inputs = load_inputs(cfg)
    key = soup_key(cfg, inputs)
    done = layout.stage_done(cfg, "soup", key)
    if done and not force and storage.exists(storage.join(pub.run_uri(cfg, done["run_id"]), "report.json")):
        report = pub.read_report(cfg, done["run_id"])
        seconds = round(time.time() - t_start, 1)
        log(f"soup: inputs unchanged since run {done['run_id']}: reused ({seconds}s)")
        layout.mark_done(cfg, "soup", key, {**{k: done.get(k) for k in ("run_id", "run_uri", "published",
                                                                         "published_val")},
                                            "reused": 0, "computed": 0, "unit": "mixtures", "scores_reused": 0,
                                            "scores_computed": 0, "seconds": seconds})
        if show_table:
            log(rep.markdown_table(report))
        return report
    if force:
        storage.delete(layout.soup_memo_root(cfg))
        storage.delete(layout.fused_scores_uri(cfg))
    init_ray(cfg)  # `frankensoup soup` alone starts or joins Ray like `run` does
    ids, meta = inputs.ids, inputs.meta
    log(f"soup: {len(ids)} ingredients x {len(inputs.components)} components "
        f"({', '.join(inputs.component_names)}), {cfg.soup.num_evaluators} evaluators, "
        f"W = {cfg.soup.num_workers}, optimizer {cfg.soup.optimizer}")
    run_id = pub.make_run_id(key)
    layout.clear_done(cfg, "soup")

    val, id_test, ood = split_names(cfg)
    # the models the methods make are scored from files every scoring actor can read
    scratch = storage.join(layout.soup_root(cfg), f"scratch-{run_id}")
    try:
        t0 = time.time()
        result, counts = search_on_ray(cfg, inputs, run_id, log, ModelServices(cfg, inputs, scratch, val))
        timings = {**result.timings, "search": time.time() - t0}

        t0 = time.time()
        fused = fuse_methods(result.betas, inputs.ingredients, inputs.components)
        states = {ZERO_SHOT: inputs.reference.state_dict(), **fused,
                  **{n: r.state for n, r in result.results.items() if r.state is not None}}
        ensembles = {n: r.ensemble for n, r in result.results.items() if r.ensemble is not None}
        scores, scores_reused, scores_made = score_fused(cfg, inputs, states, scratch, [val, id_test, *ood], ensembles)
    finally:
        storage.delete(scratch)
    counts.update(scores_reused=scores_reused, scores_computed=scores_made)
    log(f"soup: model scores: {scores_reused} reused, {scores_made} scored")
    timings["scoring"] = time.time() - t0
    _note_if_val_moved(result, scores, val, log)

    t0 = time.time()
    base_clip, _ = load_base_clip(cfg)
    made = {**fused, **{n: r.state for n, r in result.results.items() if r.state is not None}}
    published = cfg.soup.publish  # an enabled method whose result is one model (checked at load)
    files = pub.fused_files(base_clip, meta["model_name"], meta["preprocess"], made[published],
                            list(meta["class_names"]))
    timings["total"] = time.time() - t_start
    report = build_report(cfg, run_id, ids, inputs.component_names, result, scores, inputs.evaluations,
                          timings, counts, key)
    files.update(report_files(report))
    dest = pub.publish_run(cfg, run_id, files, report=report)  # with the report: fused/README.md, the model card
    seconds = round(time.time() - t_start, 1)
    layout.mark_done(cfg, "soup", key, {"run_id": run_id, "run_uri": layout.relative(cfg, dest),
                                        "published": published,
                                        "published_val": report["methods"][published]["val"],
                                        "reused": counts["from_memo"], "computed": counts["evaluated"],
                                        "unit": "mixtures", "scores_reused": scores_reused,
                                        "scores_computed": scores_made, "seconds": seconds})
    log(f"soup: published {dest} ({time.time() - t0:.1f}s); LATEST -> {run_id}")
    tracking.log_soup(cfg, report, log=log)
    if show_table:
        log(rep.markdown_table(report))
    return report


def _note_if_val_moved(result: SearchResult, scores: dict, val: str, log: Log) -> None:
    """The published model is fused tensor by tensor, the search's in one matrix product: the
    val accuracies should agree; say so plainly when rounding flipped a prediction."""
    for name, acc in result.search_val.items():
        published = scores[name][val]["accuracy"]
        if abs(published - acc) > 1e-12:
            log(f"soup: note: {name} val {published:.4f} as published vs {acc:.4f} in the search (float rounding)")
