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
from ..config import Config
from ..errors import UserError
from ..keys import digest

Log = Callable[[str], None]
# the model name results.parquet gives prepare's zero-shot classifier (the soup reads it by this name)
ZERO_SHOT = "zero_shot"


class EvaluateInputError(UserError, ValueError):
    """The evaluate stage's inputs are missing or unusable; the message names them."""


def read_inputs(cfg: Config) -> dict:
    """The ingredient registry (finetune or import-ingredients must have written one)."""
    from ..finetune.registry import read_registry

    return read_registry(cfg)


def models_to_score(cfg: Config, registry: dict) -> dict[str, tuple[str, str]]:
    """{model name: (checkpoint URI, sha256)}: the zero-shot classifier, then every ``ok``
    ingredient."""
    from ..finetune.registry import usable
    from ..inputs import zero_shot_record

    rows = usable(registry)
    if not rows:
        raise EvaluateInputError(f"{layout.registry_uri(cfg)} lists no ingredient with status 'ok'")
    if any(r["id"] == ZERO_SHOT for r in rows):
        raise EvaluateInputError(f"{layout.registry_uri(cfg)}: ingredient id {ZERO_SHOT!r} is reserved "
                                 f"for the zero-shot classifier")
    return {ZERO_SHOT: (layout.zeroshot_uri(cfg), zero_shot_record(cfg)["sha256"]),
            **{r["id"]: (r["checkpoint_uri"], r["sha256"]) for r in rows}}


def verify_checkpoints(models: dict[str, tuple[str, str]], names) -> None:
    """Checkpoints about to be scored must hold the registered content: one line naming the
    model and file otherwise (not a traceback from a scoring actor)."""
    from ..model.weights import check_finite

    for name in names:
        uri, sha = models[name]
        data = storage.read_bytes(uri)
        if storage.sha256(data) != sha:
            raise EvaluateInputError(f"model {name!r} ({uri}): sha256 differs from the registry's "
                                     "(the file changed after it was registered)")
        try:
            from safetensors.torch import load

            tensors = load(data)
        except Exception as e:  # safetensors raises its own types; one message naming the file
            raise EvaluateInputError(f"model {name!r} ({uri}) is not a safetensors file: {e}") from None
        try:
            check_finite(tensors, f"model {name!r} ({uri})")
        except ValueError as e:
            raise EvaluateInputError(str(e)) from None


def splits_to_score(cfg: Config) -> dict:
    """val, id_test, then the ood splits in config order."""
    val = layout.split_of_role(cfg, "val")
    id_test = layout.split_of_role(cfg, "id_test")
    return dict([val, id_test, *layout.ood_splits(cfg).items()])


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
    """A line every ``every_s`` seconds while images are scored, and one at the end."""
    last = [time.time()]

    def progress(done: int, total: int) -> None:
        if done == total or time.time() - last[0] >= every_s:
            last[0] = time.time()
            log(f"evaluate: {done:,} / {total:,} images scored")

    return progress


def read_results(cfg: Config) -> list[dict]:
    """evaluate/results.parquet as a list of rows."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(layout.evaluations_uri(cfg)))).to_pylist()


def run_evaluate(cfg: Config, force: bool = False, log: Log = print) -> dict:
    """Score every model on every split, reusing every score whose key (checkpoint sha256,
    split content, scoring) is in evaluate/memo.json (none with ``force``); write the results
    table; returns the stage marker."""
    from .scores import ScoreMemo, score_keys, score_with_memo

    t0 = time.time()
    registry = read_inputs(cfg)
    models = models_to_score(cfg, registry)
    gone = [m for m, (uri, _) in models.items() if not storage.exists(uri)]
    if gone:  # named before anything is scored, even when every score is in the memo
        raise EvaluateInputError(f"model {gone[0]!r}: checkpoint {models[gone[0]][0]} is missing: "
                                 "run `frankensoup finetune` (or import it again)")
    splits = splits_to_score(cfg)
    if force:
        storage.delete(layout.evaluate_memo_uri(cfg))
    memo = ScoreMemo(layout.evaluate_memo_uri(cfg))
    # the old marker goes first: if scoring fails, the stage reads as not done (scores already
    # made stay in the memo)
    layout.clear_done(cfg, "evaluate")
    keys = score_keys(cfg, {m: sha for m, (_, sha) in models.items()}, splits)
    unscored = [m for m in models if any(keys[m, s] not in memo for s in splits)]
    if unscored:
        verify_checkpoints(models, unscored)
        from ..raycluster import init_ray

        init_ray(cfg)
    scores, reused, computed = score_with_memo(cfg, memo, models, splits, registry["class_names"],
                                               progress=progress_printer(log), key=keys)
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
