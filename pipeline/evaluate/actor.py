"""The mixture evaluator built from a run's URIs, in-process (`build_mixture_evaluator`) and as
a Ray actor (`MixtureEvaluatorActor`) wrapping the very same class. The soup search
dispatches its candidate mixtures to these actors (pipeline/soup/pool.py)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import ray
import torch

from .. import layout, storage
from ..config import Config, ConfigError
from ..data.shards import decode_image, read_split
from ..ingredients import Ingredient, RunModel, read_registry, usable, verify
from ..raycluster import placement
from ..model import components, image_transform, load_classifier
from ..mixture import Score, ShardCount, Threshold
from .evaluator import MixtureEvaluator, ValImages
from ..scoring import scoring_tensors, split_scoring


def chosen_ingredients(cfg: Config, ingredient_ids: Sequence[str] | None) -> list[Ingredient]:
    """The ingredients to mix: ``ingredient_ids`` in that order, or every ``ok`` one in registry
    order."""
    found = usable(read_registry(cfg))
    if ingredient_ids is None:
        chosen = found
    else:
        by_id = {i.id: i for i in found}
        unknown = [i for i in ingredient_ids if i not in by_id]
        if unknown:
            raise ConfigError(f"ingredients {unknown} are not 'ok' ingredients of {layout.registry_uri(cfg)}")
        chosen = [by_id[i] for i in ingredient_ids]
    if not chosen:
        raise ConfigError(f"no ingredients to mix in {layout.registry_uri(cfg)}")
    return chosen


# every evaluator on a node reads a checkpoint through this folder: object storage is read once
NODE_CACHE = os.path.join(tempfile.gettempdir(), "frankensoup-checkpoints")


def node_cached_bytes(uri: str, sha256: str, cache_dir: str = NODE_CACHE) -> bytes:
    """The bytes of the file at ``uri`` whose content hash is ``sha256``, through a node-local
    cache keyed by that hash: the first evaluator on a node copies it (under a file lock, so the
    others wait for the copy instead of reading storage too), the rest read the local copy. A
    copy whose hash does not match is replaced, never used; the caller verifies what it gets."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{sha256}.safetensors")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path):
                with open(path, "rb") as f:
                    data = f.read()
                if storage.sha256(data) == sha256:
                    return data
            data = storage.read_bytes(uri)
            if storage.sha256(data) == sha256:  # never cache what verify would refuse
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            return data
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class IngredientCheckpoints(Sequence):
    """The ingredients' state dicts, read (through the node-local cache) and verified when
    indexed: the evaluator loads a row when a mixture first uses it, so host memory holds one
    checkpoint at a time and a checkpoint no mixture uses is never read."""

    def __init__(self, ingredients: Sequence[Ingredient], run: RunModel, cache_dir: str = NODE_CACHE):
        self.ingredients, self.run, self.cache_dir = list(ingredients), run, cache_dir

    def __len__(self) -> int:
        return len(self.ingredients)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        if not 0 <= j < len(self.ingredients):
            raise IndexError(j)
        ingredient = self.ingredients[j]
        data = node_cached_bytes(ingredient.checkpoint_uri, ingredient.sha256, self.cache_dir)
        return verify(ingredient, data, self.run)


class SplitImages(ValImages):
    """A split's encoded images, decoded when a shard of them is first served: resized and
    cropped into uint8 (a quarter of float32), then, per batch on the device, divided by 255
    and normalised with the very float32 operations of the eval transform's ToTensor and
    Normalize, so the model sees bit-equal input tensors. Divisors are device tensors: CUDA
    multiplies by the reciprocal when the divisor is a CPU scalar."""

    def __init__(self, encoded: Sequence[bytes], preprocess: dict, source: str = "split"):
        from torchvision.transforms import Compose, Normalize

        if len(encoded) == 0:
            raise ConfigError(f"{source}: split has no rows")
        self.encoded, self.source = encoded, source
        steps = list(image_transform(preprocess, train=False).transforms)
        if not (len(steps) >= 2 and isinstance(steps[-1], Normalize) and "ToTensor" in type(steps[-2]).__name__):
            raise ValueError(f"the eval transform does not end in ToTensor, Normalize: {steps}")
        self.geometry = Compose(steps[:-2])  # resize, crop, RGB: PIL in, PIL out
        self.mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        size = preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        self.image_bytes = 3 * h * w

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def nbytes(self) -> int:
        return len(self.encoded) * self.image_bytes

    def rows(self, start: int, stop: int) -> torch.Tensor:
        out = []
        for i in range(start, stop):
            image = self.geometry(decode_image(self.encoded[i], source=f"{self.source} row {i}"))
            # what ToTensor does before it converts to float
            out.append(torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1))
        return torch.stack(out).contiguous()

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        device = batch.device
        if device not in self._on:
            self._on[device] = (torch.full((1,), 255.0, device=device), self.mean.to(device), self.std.to(device))
        scale, mean, std = self._on[device]
        return batch.to(torch.float32).div_(scale).sub_(mean).div_(std)


def build_mixture_evaluator(cfg: Config, split_name: str = "val", ingredient_ids: Sequence[str] | None = None,
                            *, device: str | torch.device | None = None) -> MixtureEvaluator:
    """A MixtureEvaluator over the registry's ingredients (rows of beta in ``ingredient_ids``
    order) on ``split_name`` with the eval transform, with components at
    ``cfg.soup.granularity`` and the split's class_subset / class_map. Val shards are decoded
    when first scored (uint8), ingredient rows loaded when first mixed."""
    ingredients = chosen_ingredients(cfg, ingredient_ids)
    splits = layout.splits(cfg)
    if split_name not in splits:
        raise ConfigError(f"no split named {split_name!r}; the run's splits are {sorted(splits)}")
    torch.set_num_threads(cfg.evaluate.threads)  # decoding too, not only the evaluator's arithmetic
    # the architecture from prepare's zero-shot classifier: no evaluator reads a checkpoint it never mixes
    model, meta = load_classifier(layout.zeroshot_uri(cfg))
    split = read_split(splits[split_name].uri)
    images = SplitImages(split.table.column("image").to_pylist(), meta["preprocess"], source=split.uri)
    labels = torch.from_numpy(split.table.column("label").to_numpy().astype(np.int64))
    scoring = split_scoring(split_name, splits[split_name], split.class_names, meta["class_names"])
    target_of_label, class_mask, class_map = scoring_tensors(scoring, "cpu")
    ev = cfg.evaluate
    return MixtureEvaluator(model, IngredientCheckpoints(ingredients, RunModel.of_run(cfg)),
                            components(model, cfg.soup.granularity),
                            images, target_of_label[labels], dtype=ev.ingredient_dtype, device=device,
                            batch_size=ev.batch_size, class_mask=class_mask, class_map=class_map,
                            threads=ev.threads, memory_limit_gb=ev.memory_limit_gb,
                            working_set_gb=ev.working_set_gb)


def evaluator_device(cfg: Config) -> str:
    """The actor's device: a GPU only when the actor was given one."""
    return "cuda" if cfg.soup.evaluator_resources.gpu > 0 and torch.cuda.is_available() else "cpu"


def _evaluator_metrics():
    """Busy seconds and call latency for the dashboard (per node); None where Ray has no metrics
    agent (in-process use, a bare test): the evaluator works the same without them."""
    try:
        from ..metrics import EvaluatorMetrics

        return EvaluatorMetrics()
    except Exception:
        return None


# the probe images: the first val images, whole batches (pipeline/soup/probe.py compares the
# evaluators' predictions on them)
PROBE_IMAGES = 512


def probe_predictions(evaluator, betas, n_images: int = PROBE_IMAGES) -> bytes:
    """A MixtureEvaluator's predicted class per probe image (the first ``n_images`` val images,
    in the batches scoring runs) for each mixture, as int64 bytes: what the evaluator's accuracy
    counts, before comparing with labels. The images come from the val shards the evaluator
    holds, else are read for the probe alone: it keeps no copy of them beside its shards."""
    n = min(n_images, evaluator.n_images)
    out = evaluator.predictions_each([np.asarray(beta, dtype=np.float64) for beta in betas], 0, n)
    return torch.cat(out).to(torch.int64).numpy().tobytes()


class EvaluatorHost:
    """What a MixtureEvaluatorActor holds: one MixtureEvaluator, built once from URIs."""

    def __init__(self, cfg: Config, split_name: str = "val", ingredient_ids: Sequence[str] | None = None):
        torch.set_num_threads(cfg.evaluate.threads)  # pinned: results never depend on the node's load
        self.ids = [i.id for i in chosen_ingredients(cfg, ingredient_ids)]
        self.split_name = split_name
        self.evaluator = build_mixture_evaluator(cfg, split_name, self.ids, device=evaluator_device(cfg))
        self.metrics = _evaluator_metrics()

    def _busy(self):
        return self.metrics.evaluating() if self.metrics is not None else contextlib.nullcontext()

    def evaluate(self, betas: Sequence) -> list[float]:
        with self._busy():
            return self.evaluator.evaluate(list(betas))

    def score(self, betas: Sequence, thresholds: Sequence[Threshold | None] | None = None) -> list[Score]:
        """Val accuracy per mixture; one with a threshold stops early once it cannot pass."""
        with self._busy():
            return self.evaluator.score(list(betas), thresholds)

    def probe(self, betas: Sequence) -> bytes:
        """Predictions on the probe images for the probe mixtures (pipeline/soup/probe.py)."""
        return probe_predictions(self.evaluator, list(betas))

    def score_shard(self, beta, start: int, stop: int, allowed: int | None = None) -> ShardCount:
        """One shard of one evaluation (val images [start, stop), whole batches): its integer count."""
        with self._busy():
            return self.evaluator.score_shard(beta, start, stop, allowed)

    def info(self) -> dict:
        ev = self.evaluator
        return {"ingredient_ids": self.ids, "split": self.split_name, "beta_shape": list(ev.beta_shape),
                "component_names": list(ev.component_names), "n_images": int(ev.n_images),
                "batch_size": ev.batch_size,
                "device": str(ev.device), "dtype": str(ev.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), **placement(ev.device),
                "device_name": torch.cuda.get_device_name(ev.device) if ev.device.type == "cuda" else "cpu"}


# resources come from the caller: .options(num_cpus=..., num_gpus=...) (soup.evaluator_resources)
MixtureEvaluatorActor = ray.remote(EvaluatorHost)
