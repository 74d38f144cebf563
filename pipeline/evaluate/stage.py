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
from .stream import score_splits

Log = Callable[[str], None]
# the model name results.parquet gives prepare's zero-shot classifier (the soup reads it by this name)
ZERO_SHOT = "zero_shot"


class EvaluateInputError(UserError, ValueError):
    """The evaluate stage's inputs are missing or unusable; the message names them."""


def read_inputs(cfg: Config) -> dict:
    """The ingredient registry of a finished finetune stage."""
    from ..finetune.registry import read_registry

    if layout.stage_done(cfg, "finetune") is None:
        raise EvaluateInputError(f"evaluate needs a finished finetune stage under these settings in "
                                 f"{cfg.output_uri!r}: run `frankensoup finetune` (or import-ingredients) first")
    return read_registry(cfg)


def models_to_score(cfg: Config, registry: dict) -> dict[str, str]:
    """{model name: checkpoint URI}: the zero-shot classifier, then every ``ok`` ingredient."""
    from ..finetune.registry import usable
    from ..prepare import zeroshot_uri

    rows = usable(registry)
    if not rows:
        raise EvaluateInputError(f"{layout.registry_uri(cfg)} lists no ingredient with status 'ok'")
    if any(r["id"] == ZERO_SHOT for r in rows):
        raise EvaluateInputError(f"{layout.registry_uri(cfg)}: ingredient id {ZERO_SHOT!r} is reserved "
                                 f"for the zero-shot classifier")
    return {ZERO_SHOT: zeroshot_uri(cfg), **{r["id"]: r["checkpoint_uri"] for r in rows}}


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
    """Score every model on every split and write the results; returns the stage marker.
    Skipped when done under the same settings, unless ``force``."""
    done = layout.stage_done(cfg, "evaluate")
    if done and not force:
        log(f"evaluate: already done under these settings ({done['finished']}), skipping")
        log(markdown_table(read_results(cfg)))
        return done
    registry = read_inputs(cfg)
    models = models_to_score(cfg, registry)
    splits = splits_to_score(cfg)
    from ..raycluster import init_ray

    init_ray(cfg)
    # the old marker goes first: if scoring fails, the stage reads as not done (old results stay
    # behind, but nothing vouches for them)
    layout.clear_done(cfg, "evaluate")
    t0 = time.time()
    log(f"evaluate: {len(models)} models x {len(splits)} splits ({', '.join(splits)}), "
        f"{cfg.evaluate.num_actors} scoring actor(s)")
    ev = cfg.evaluate
    scores = score_splits(models, splits, batch_size=ev.batch_size, num_actors=ev.num_actors,
                          resources=ev.resources, class_names=registry["class_names"],
                          threads=ev.threads,
                          # the mixture evaluator's precision, so one-hot scores in the soup equal this table
                          autocast_bf16=ev.ingredient_dtype == "bfloat16", progress=progress_printer(log))
    rows = result_rows(scores, splits)
    table = markdown_table(rows)
    storage.write_bytes(layout.evaluations_uri(cfg), parquet_bytes(rows))
    storage.write_bytes(layout.evaluations_uri(cfg, "md"),
                        f"# Top-1 accuracy (%)\n\n{table}\n".encode())
    seconds = round(time.time() - t0, 1)
    images = sum(scores[s][ZERO_SHOT]["n"] for s in splits)
    log(table)
    log(f"evaluate: {len(models)} models on {images} images in {seconds}s; results at {layout.evaluations_uri(cfg)}")
    val = next(iter(splits))
    best = max((m for m in models if m != ZERO_SHOT), key=lambda m: scores[val][m]["accuracy"])
    layout.mark_done(cfg, "evaluate", {"models": list(models), "splits": list(splits), "images": images,
                                       "best_val": {"model": best, "accuracy": scores[val][best]["accuracy"]},
                                       "seconds": seconds})
    return layout.stage_done(cfg, "evaluate")
