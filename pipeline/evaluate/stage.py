"""The evaluate stage: the zero-shot classifier and every usable ingredient, scored on val,
id_test and every ood split in one Ray Data pass (``stream.score_splits``).

Reads: finetune/ingredients.json, the checkpoints, prepare's zero-shot classifier, the shards.
Writes: evaluate/results.parquet (model, split, role, accuracy, correct, n), evaluate/results.md,
evaluate/_DONE.json (docs/outputs.md)."""
from __future__ import annotations

import io
import time
from collections.abc import Callable

from .. import layout, storage
from ..console import Progress
from ..config import Config
from ..errors import UserError
from ..ingredients import Ingredient, IngredientError, RunModel, read_registry, usable, verify
from ..prepared import ZERO_SHOT, zero_shot_record
from ..keys import digest
from ..raycluster import init_ray
from ..scores import ScoreMemo, score_keys, splits_to_score
from .stream import score_with_memo

Log = Callable[[str], None]


class EvaluateInputError(UserError, ValueError):
    """The evaluate stage's inputs are missing or unusable; the message names them."""


def models_to_score(cfg: Config, registry: dict) -> dict[str, Ingredient]:
    """{model name: ingredient}: the zero-shot classifier (its sha256 recorded by prepare), then
    every ``ok`` ingredient."""

    found = usable(registry)
    if not found:
        raise EvaluateInputError(f"{layout.registry_uri(cfg)} lists no ingredient with status 'ok'")
    if any(i.id == ZERO_SHOT for i in found):
        raise EvaluateInputError(f"{layout.registry_uri(cfg)}: ingredient id {ZERO_SHOT!r} is reserved "
                                 f"for the zero-shot classifier")
    zero_shot = Ingredient(ZERO_SHOT, "ok", layout.zeroshot_uri(cfg), zero_shot_record(cfg)["sha256"], "prepare")
    return {i.id: i for i in [zero_shot, *found]}


def verify_checkpoints(cfg: Config, models: dict[str, Ingredient], names) -> None:
    """Checkpoints about to be scored must be the registered files of the run's model: one line
    naming the model and file otherwise (not a traceback from a scoring actor)."""
    run = RunModel.of_run(cfg)
    for name in names:
        try:
            verify(models[name], storage.read_bytes(models[name].checkpoint_uri), run)
        except IngredientError as e:
            raise EvaluateInputError(str(e)) from None


def result_rows(scores: dict[str, dict[str, dict]], splits: dict) -> list[dict]:
    """One row per (model, split), models in scoring order."""
    models = list(next(iter(scores.values())))
    return [{"model": m, "split": s, "role": splits[s].role, "accuracy": scores[s][m]["accuracy"],
             "correct": scores[s][m]["correct"], "n": scores[s][m]["n"]} for m in models for s in splits]


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("model", pa.string()), ("split", pa.string()), ("role", pa.string()),
                        ("accuracy", pa.float64()), ("correct", pa.int64()), ("n", pa.int64())])
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue()


def markdown_table(rows: list[dict]) -> str:
    """Rows = models, columns = splits and the ood average (unweighted, as the papers report it);
    top-1 accuracy in percent."""
    splits = list(dict.fromkeys(r["split"] for r in rows))
    ood = [s for s in splits if any(r["split"] == s and r["role"] == "ood" for r in rows)]
    acc = {(r["model"], r["split"]): r["accuracy"] for r in rows}
    header = ["model", *splits] + (["ood avg"] if ood else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = [f"{100 * acc[m, s]:.2f}" for s in splits]
        if ood:
            cells.append(f"{100 * sum(acc[m, s] for s in ood) / len(ood):.2f}")
        lines.append("| " + " | ".join([m, *cells]) + " |")
    return "\n".join(lines)


def progress_printer(log: Log, every_s: float = 10.0) -> Callable[[int, int], None]:
    """``progress(done, total)`` for score_splits: images scored with rate and ETA, as a bar on a
    terminal or a line every ``every_s`` seconds and one at the end (console.Progress); each
    scoring pass gets its own."""
    current: list[Progress] = []

    def progress(done: int, total: int) -> None:
        if not current:
            current.append(Progress(total, "evaluate", "image", every_s=every_s, log=log))
        current[0].update(done, total)
        if done >= total:
            current.pop().close()

    return progress


def read_results(cfg: Config) -> list[dict]:
    """evaluate/results.parquet as a list of rows."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(layout.evaluations_uri(cfg)))).to_pylist()


def run_evaluate(cfg: Config, force: bool = False, log: Log = print) -> dict:
    """Score every model on every split, reusing every score whose key (checkpoint sha256,
    split content, scoring) is in evaluate/memo.json (none with ``force``); write the results
    table; returns the stage marker."""

    t0 = time.time()
    registry = read_registry(cfg)
    models = models_to_score(cfg, registry)
    gone = [m for m, i in models.items() if not storage.exists(i.checkpoint_uri)]
    if gone:  # named before anything is scored, even when every score is in the memo
        raise EvaluateInputError(f"model {gone[0]!r}: checkpoint {models[gone[0]].checkpoint_uri} is missing: "
                                 "run `frankensoup finetune` (or import it again)")
    splits = splits_to_score(cfg)
    if force:
        storage.delete(layout.evaluate_memo_uri(cfg))
    memo = ScoreMemo(layout.evaluate_memo_uri(cfg))
    # the old marker goes first: if scoring fails, the stage reads as not done (scores already
    # made stay in the memo)
    layout.clear_done(cfg, "evaluate")
    keys = score_keys(cfg, {m: i.sha256 for m, i in models.items()}, splits)
    unscored = [m for m in models if any(keys[m, s] not in memo for s in splits)]
    if unscored:
        verify_checkpoints(cfg, models, unscored)
        init_ray(cfg)
    checkpoints = {m: (i.checkpoint_uri, i.sha256) for m, i in models.items()}
    scores, reused, computed = score_with_memo(cfg, memo, checkpoints, splits, registry["class_names"],
                                               progress=progress_printer(log, cfg.console.status_every_s), key=keys)
    rows = result_rows(scores, splits)
    table = markdown_table(rows)
    storage.write_bytes(layout.evaluations_uri(cfg), parquet_bytes(rows))
    storage.write_bytes(layout.evaluations_uri(cfg, "md"), f"# Top-1 accuracy (%)\n\n{table}\n".encode())
    seconds = round(time.time() - t0, 1)
    log(f"evaluate: {len(models)} models x {len(splits)} splits: {reused} scores reused, {computed} scored ({seconds}s)")
    if computed:
        log(table)
    val = next(iter(splits))
    best = max((m for m in models if m != ZERO_SHOT), key=lambda m: scores[val][m]["accuracy"])
    return layout.mark_done(cfg, "evaluate", digest(sorted(keys.values())), {
        "models": list(models), "splits": list(splits),
        "best_val": {"model": best, "accuracy": scores[val][best]["accuracy"]},
        "reused": reused, "computed": computed, "unit": "scores", "seconds": seconds})
