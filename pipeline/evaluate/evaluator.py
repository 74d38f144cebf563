"""The fast mixture evaluator: score many mixtures (beta matrices) on one resident val split.

Ingredients are rows of a working set on the device (``WorkingSet``: a row is loaded when a
mixture first uses it, the least recently used is evicted within a budget), each laid out by
component so each component is one contiguous range. The one resident model's parameters are
views into a flat buffer with the same layout, so fusing a mixture is a sum over the
ingredients it uses, per component, written straight into the model:

    flat[slice_c] = sum_{j: beta[j, c] != 0} beta[j, c] * W[j, slice_c]

followed by a forward pass over preprocessed images. Val is cut into shards of whole batches
(``shard_bounds``); ``score_shard`` counts one shard, so one evaluation can run on many
evaluators and their integer counts are summed. No Ray here: the Ray actor wraps this class.
See docs/evaluator.md.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..mixture import (EvaluatorInputError, Score, ShardCount, Threshold, component_tensors, from_bytes,
                       misses_allowed, shard_bounds, tensor_owners, validate)
from ..scoring import predictions, scoring_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# elements of the float32 scratch block fusion multiplies into (16 MiB): preallocated once,
# so no row of a mixture allocates a temporary
UPCAST_BLOCK_ELEMENTS = 1 << 22
GIB = 1 << 30


class EvaluatorMemoryError(UserError, MemoryError):
    """The stacked ingredients and val tensors would not fit the device's memory."""


# ---- layout ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlatLayout:
    """Where each mixed tensor lives in the flat buffer, ordered component by component."""
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    component_names: tuple[str, ...]
    component_slices: tuple[tuple[int, int], ...]
    n_params: int  # elements in the flat buffer (parameters + mixed buffers)


def mixable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, then floating buffers (BatchNorm statistics): what a component may name."""
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    return tensors


def flat_layout(model: torch.nn.Module, components: Sequence) -> FlatLayout:
    """Lay the mixed tensors out by component: every parameter in exactly one component, floating
    buffers where a component lists them (the others stay the model's own)."""
    tensors = mixable_tensors(model)
    params = {n for n, _ in model.named_parameters()}
    if not params:
        raise EvaluatorInputError("the model has no parameters to mix")
    owner = tensor_owners(components, tensors, unknown="which is not a parameter or floating buffer of the model",
                          error=EvaluatorInputError)
    names, shapes, offsets, slices = [], [], [], []
    offset = 0
    for comp in components:
        start = offset
        for name in component_tensors(comp):
            names.append(name)
            shapes.append(tensors[name].shape)
            offsets.append(offset)
            offset += tensors[name].numel()
        slices.append((start, offset))
    missing = [n for n in params if n not in owner]
    if missing:
        raise EvaluatorInputError(f"{len(missing)} parameters are in no component: {', '.join(missing[:5])}"
                                  + (", ..." if len(missing) > 5 else ""))
    return FlatLayout(tuple(names), tuple(shapes), tuple(offsets),
                      tuple(c.name for c in components), tuple(slices), offset)


def common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise EvaluatorInputError(
            f"the model's mixed tensors must share one floating dtype, found {sorted(map(str, dtypes))}")
    return dtypes.pop()


# ---- memory ---------------------------------------------------------------------------------

def ingredient_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise EvaluatorInputError(f"ingredient dtype {dtype!r} is not one of {list(DTYPES)}")
    return DTYPES[dtype]


def row_bytes(n_params: int, dtype: str | torch.dtype) -> int:
    """Bytes of one ingredient row of the working set."""
    return n_params * torch.empty((), dtype=ingredient_dtype(dtype)).element_size()


def required_bytes(n_ingredients: int, n_params: int, dtype: str | torch.dtype,
                   images: torch.Tensor | None) -> int:
    """Device memory the evaluator holds: ``n_ingredients`` resident rows (the working set), one
    float32 fused model, the images, and the float32 scratch block fusion multiplies into.
    Forward-pass activations are not counted: leave headroom for them."""
    image_bytes = 0 if images is None else images.numel() * images.element_size()
    scratch = min(n_params, UPCAST_BLOCK_ELEMENTS) * 4
    return n_ingredients * row_bytes(n_params, dtype) + n_params * 4 + scratch + image_bytes


def working_set_rows(n_ingredients: int, n_params: int, dtype: str | torch.dtype,
                     working_set_gb: float | None) -> int:
    """Rows the working set may hold: all K without a budget, else as many as ``working_set_gb``
    GiB holds (at most K). A budget smaller than one row is refused, naming the setting."""
    if working_set_gb is None:
        return n_ingredients
    one = row_bytes(n_params, dtype)
    rows = int(working_set_gb * GIB) // one
    if rows < 1:
        raise EvaluatorMemoryError(
            f"evaluate.working_set_gb={working_set_gb:g} is smaller than one ingredient row "
            f"({n_params:,} params in {str(ingredient_dtype(dtype)).removeprefix('torch.')} = "
            f"{one / GIB:.3g} GiB); raise it to at least {one / GIB:.3g}")
    return min(rows, n_ingredients)


def _cgroup_available() -> int | None:
    """Memory left under a cgroup v2 limit (containers, Ray on Kubernetes); None if unlimited."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = _cgroup_available()
    return available if cgroup is None else min(available, cgroup)


def available_bytes(device: str | torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _host_available()


def check_fits(required: int, device: str | torch.device, limit_gb: float | None = None, *,
               detail: str = "the request") -> None:
    """Refuse before allocating anything when ``required`` bytes exceed what the device has
    free (or ``limit_gb`` GiB, when given)."""
    available = int(limit_gb * GIB) if limit_gb is not None else available_bytes(device)
    if required <= available:
        return
    have = (f"over the limit of {available / GIB:.3g} GiB (memory_limit_gb)" if limit_gb is not None
            else f"but {torch.device(device)} has {available / GIB:.3g} GiB available")
    raise EvaluatorMemoryError(
        f"mixture evaluator does not fit: {detail} needs {required / GIB:.3g} GiB, {have}; "
        "use fewer ingredients, ingredient_dtype bfloat16, a smaller val split or a bigger device")


# ---- ingredients: the working set ----------------------------------------------------------

def _check_ingredient(index: int, state: Mapping, layout: FlatLayout, known_keys: set[str]) -> None:
    if not isinstance(state, Mapping):
        raise EvaluatorInputError(f"ingredient {index} is a {type(state).__name__}, not a state dict")
    for name, shape in zip(layout.names, layout.shapes):
        if name not in state:
            raise EvaluatorInputError(f"ingredient {index}: missing tensor {name!r}")
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise EvaluatorInputError(f"ingredient {index}: {name!r} is not a floating-point tensor")
        if tensor.shape != shape:
            raise EvaluatorInputError(f"ingredient {index}: {name!r} has shape {tuple(tensor.shape)}, "
                                      f"the model's is {tuple(shape)}")
    unknown = [k for k in state if k not in known_keys]
    if unknown:
        raise EvaluatorInputError(f"ingredient {index}: key {unknown[0]!r} is not in the model's state dict")


def _first_non_finite(index: int, row: torch.Tensor, layout: FlatLayout) -> str:
    for name, offset, shape in zip(layout.names, layout.offsets, layout.shapes):
        if not torch.isfinite(row[offset:offset + shape.numel()]).all():
            return f"ingredient {index}: {name!r} holds NaN or inf"
    return f"ingredient {index} holds NaN or inf"


def load_row(row: torch.Tensor, index: int, state: Mapping, layout: FlatLayout, known_keys: set[str]) -> None:
    """Copy ingredient ``index``'s state dict into ``row`` in the layout's order, checked."""
    _check_ingredient(index, state, layout, known_keys)
    for name, offset, shape in zip(layout.names, layout.offsets, layout.shapes):
        row[offset:offset + shape.numel()].copy_(state[name].reshape(-1))
    # a NaN would poison every mixture that touches this ingredient (0 * NaN = NaN)
    if not torch.isfinite(row).all():
        raise EvaluatorInputError(_first_non_finite(index, row, layout))


class WorkingSet:
    """The ingredient rows an evaluator holds: row j is read (``ingredients[j]``, which may load
    lazily) and checked when a mixture first uses it, and once ``capacity`` rows are resident
    the least recently used one is evicted (its buffer is reused). A row's values do not depend
    on when it was loaded, so nothing scored depends on what was resident before."""

    def __init__(self, ingredients: Sequence[Mapping[str, torch.Tensor]], layout: FlatLayout,
                 known_keys: set[str], dtype: torch.dtype, device: torch.device, capacity: int,
                 blocks: list[list[tuple[int, int]]] | None = None):
        if capacity < 1:
            raise EvaluatorInputError(f"the working set must hold at least one row, got {capacity}")
        self.ingredients, self.layout, self.known_keys = ingredients, layout, known_keys
        self.dtype, self.device, self.capacity = dtype, device, capacity
        self.blocks = blocks if blocks is not None else component_blocks(layout.component_slices, layout.n_params)
        self.rows: OrderedDict[int, Views] = OrderedDict()
        self.loads = 0      # rows read (a row evicted and used again is read again)
        self.peak_rows = 0  # most rows resident at once

    def __len__(self) -> int:
        return len(self.ingredients)

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.layout.n_params, self.dtype)

    @property
    def resident_bytes(self) -> int:
        return len(self.rows) * self.row_bytes

    def row(self, j: int) -> Views:
        """Row j (its per-component block views), loaded if it is not resident."""
        found = self.rows.get(j)
        if found is not None:
            self.rows.move_to_end(j)
            return found
        if len(self.rows) >= self.capacity:
            _, views = self.rows.popitem(last=False)  # least recently used: its buffer is reused
        else:
            views = Views(torch.empty(self.layout.n_params, dtype=self.dtype, device=self.device), self.blocks)
        load_row(views.tensor, j, self.ingredients[j], self.layout, self.known_keys)
        self.rows[j] = views
        self.loads += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        return views


def check_ingredients(ingredients: Sequence[Mapping[str, torch.Tensor]], layout: FlatLayout,
                      known_keys: set[str]) -> None:
    """Check state dicts already in memory (a list) at once, so a bad one is refused before the
    first mixture; a lazily loading Sequence is checked row by row as rows are loaded."""
    for j, state in enumerate(ingredients):
        _check_ingredient(j, state, layout, known_keys)
        for name in layout.names:
            if not torch.isfinite(state[name]).all():
                raise EvaluatorInputError(f"ingredient {j}: {name!r} holds NaN or inf")


# ---- fusion ---------------------------------------------------------------------------------

@contextlib.contextmanager
def ieee_float32_matmul(device: torch.device):
    """TF32 would round the weights, so one-hot mixtures would no longer be bit-exact."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def component_blocks(slices: Sequence[tuple[int, int]], block: int) -> list[list[tuple[int, int]]]:
    """Each component's range cut into blocks of at most ``block`` elements (the scratch size)."""
    return [[(s, min(s + block, stop)) for s in range(start, stop, block)] for start, stop in slices]


class Views:
    """Per-component block views of a flat tensor, made once: fusing then slices nothing."""

    def __init__(self, tensor: torch.Tensor, blocks: list[list[tuple[int, int]]], at_zero: bool = False):
        self.tensor = tensor
        self.blocks = [[tensor[:e - s] if at_zero else tensor[s:e] for s, e in comp] for comp in blocks]
        self.whole = [tensor[comp[0][0]:comp[-1][1]] if comp and not at_zero else None for comp in blocks]


def fuse_into(flat: Views, row: Callable[[int], Views], beta: np.ndarray, scratch: Views) -> None:
    """Write the mixture ``beta`` ([K, C]) into the flat buffer:
    flat[slice_c] = sum over j with beta[j, c] != 0, in row order, of beta[j, c] * W[j, slice_c],
    each term and the running sum in float32 (the very arithmetic of
    ``pipeline.soup.mixing.fuse_many``). Rows are visited one at a time (``row(j)`` may load
    it), each used for every component it weights, so a component's terms still come in row
    order; rows a mixture does not use are never read, so the fused weights depend only on the
    rows it mixes. A one-hot mixture gives its row bit for bit. Terms past a component's first
    are multiplied into the preallocated float32 ``scratch`` block: no temporaries."""
    coeffs = np.asarray(beta, dtype=np.float32)  # the float32 coefficients decide what is used
    started = [False] * len(flat.blocks)
    with torch.no_grad(), ieee_float32_matmul(flat.tensor.device):
        for j in np.flatnonzero(coeffs.any(axis=1)).tolist():
            weights = row(j)
            same = weights.tensor.dtype == torch.float32
            for c in np.flatnonzero(coeffs[j]).tolist():
                out_blocks = flat.blocks[c]
                if not out_blocks:
                    continue
                coef = float(coeffs[j, c])  # a float32 value: the multiply is in float32
                w_blocks = weights.blocks[c]
                if not started[c]:
                    started[c] = True
                    out, w = flat.whole[c], weights.whole[c]
                    if same:
                        torch.mul(w, coef, out=out)
                    else:  # the upcast is exact; the multiply is the float32 one
                        out.copy_(w)
                        out.mul_(coef)
                    continue
                for out, w, tmp in zip(out_blocks, w_blocks, scratch.blocks[c]):
                    if same:
                        torch.mul(w, coef, out=tmp)
                    else:
                        tmp.copy_(w)
                        tmp.mul_(coef)
                    out.add_(tmp)


# ---- scoring --------------------------------------------------------------------------------

class ValImages:
    """The val images an evaluator scores, already preprocessed, as one tensor [N, ...].
    ``rows(start, stop)`` gives a range in its stored form and ``prepare`` turns a batch of it,
    on the device, into the model's input: here the identity. A subclass may decode ranges on
    demand and store them smaller (``evaluate/actor.py``: uint8, normalised per batch), provided
    ``prepare`` gives bit-equal input tensors."""

    def __init__(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.dim() < 1 or images.shape[0] == 0:
            raise EvaluatorInputError("images must be a non-empty tensor [N, ...]")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of every image in stored form (what serving every shard costs)."""
        return self.images.numel() * self.images.element_size()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.images[start:stop]

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


def _check_labels(n: int, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
        raise EvaluatorInputError(f"labels must be an integer tensor of shape ({n},), "
                                  f"got {getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- the evaluator --------------------------------------------------------------------------

class MixtureEvaluator:
    """``evaluate(list of beta [K, C]) -> list of val accuracies`` on one resident model.

    The evaluator owns ``model``: its parameters (and the floating buffers a component lists)
    become views into the evaluator's flat buffer; do not move or cast the model afterwards.
    Buffers no component lists stay the model's own. ``images`` is a tensor of preprocessed
    images or a ``ValImages``; a shard of it is moved to the device when first scored and kept.
    ``working_set_gb`` bounds the ingredient rows held at once (None: all K may stay).
    """

    def __init__(self, model: torch.nn.Module, ingredients: Sequence[Mapping[str, torch.Tensor]],
                 components: Sequence, images: torch.Tensor | ValImages, labels: torch.Tensor, *,
                 dtype: str = "float32", device: str | torch.device | None = None,
                 batch_size: int = 256, class_mask: torch.Tensor | None = None,
                 class_map: torch.Tensor | None = None, threads: int | None = None,
                 memory_limit_gb: float | None = None, working_set_gb: float | None = None):
        if threads is not None:
            # pinned so results do not depend on how many evaluators share a node
            torch.set_num_threads(int(threads))
        if batch_size <= 0:
            raise EvaluatorInputError(f"batch_size must be > 0, got {batch_size}")
        if len(ingredients) == 0:
            raise EvaluatorInputError("no ingredients to mix")
        self.device = _resolve_device(device)
        self.dtype = ingredient_dtype(dtype)
        self.batch_size = batch_size
        self.layout = flat_layout(model, components)
        tensors = mixable_tensors(model)
        flat_dtype = common_dtype([tensors[name] for name in self.layout.names])
        self.val = images if isinstance(images, ValImages) else ValImages(images)
        self.n_images = len(self.val)
        _check_labels(self.n_images, labels)
        mask = scoring_mask(class_mask, class_map)

        k, n = len(ingredients), self.layout.n_params
        rows = working_set_rows(k, n, self.dtype, working_set_gb)
        detail = (f"{rows} ingredients x {n:,} params in {str(self.dtype).removeprefix('torch.')} "
                  f"+ {self.n_images:,} images")
        check_fits(required_bytes(rows, n, self.dtype, None) + self.val.nbytes, self.device, memory_limit_gb,
                   detail=detail)

        known_keys = set(model.state_dict().keys())
        if isinstance(ingredients, (list, tuple)):
            check_ingredients(ingredients, self.layout, known_keys)
        blocks = component_blocks(self.layout.component_slices, UPCAST_BLOCK_ELEMENTS)
        self.working_set = WorkingSet(ingredients, self.layout, known_keys, self.dtype, self.device, rows, blocks)
        self.scratch = Views(torch.empty(min(n, UPCAST_BLOCK_ELEMENTS), dtype=torch.float32, device=self.device),
                             blocks, at_zero=True)
        self.flat = self._adopt_tensors(model, flat_dtype)
        self._flat_views = Views(self.flat, blocks)
        self.model = model
        self._fused: bytes | None = None  # the mixture the flat buffer holds
        self._shards: dict[tuple[int, int], torch.Tensor] = {}  # val ranges moved to the device
        if type(self.val) is ValImages:  # preprocessed tensors given whole: all on the device at once
            self._shards[(0, self.n_images)] = self.val.images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.mask = None if mask is None else mask.to(self.device)
        self.class_map = None if class_map is None else class_map.to(self.device, torch.long)

    # -- public API --

    @property
    def n_ingredients(self) -> int:
        return len(self.working_set)

    @property
    def component_names(self) -> tuple[str, ...]:
        return self.layout.component_names

    @property
    def beta_shape(self) -> tuple[int, int]:
        return (self.n_ingredients, len(self.layout.component_slices))

    @property
    def images(self) -> torch.Tensor:
        """Every val image on the device, in stored form."""
        return self._stored(0, self.n_images)

    def shards(self, n_shards: int) -> list[tuple[int, int]]:
        return shard_bounds(self.n_images, self.batch_size, n_shards)

    def evaluate(self, betas: Sequence[np.ndarray]) -> list[float]:
        """Val accuracy of each mixture, in order. Every mixture is checked before any is run."""
        return [s.accuracy for s in self.score(betas)]

    __call__ = evaluate

    def score(self, betas: Sequence[np.ndarray], thresholds: Sequence[Threshold | None] | None = None) -> list[Score]:
        """Like ``evaluate``, but a mixture with a threshold is scored in batches and stopped as
        soon as its misses make the threshold unreachable: it is then reported below the
        threshold (accuracy None). A mixture that can still pass is scored in full."""
        thresholds = list(thresholds) if thresholds is not None else [None] * len(betas)
        if len(thresholds) != len(betas):
            raise EvaluatorInputError(f"{len(thresholds)} thresholds for {len(betas)} mixtures")
        checked = [self._checked(b, i) for i, b in enumerate(betas)]
        n = self.n_images
        out = []
        for beta, threshold in zip(checked, thresholds):
            t0 = time.perf_counter()
            allowed = misses_allowed(threshold, n)
            if allowed is not None and allowed < 0:
                out.append(Score(None, 0, time.perf_counter() - t0))  # no count of correct images can pass
                continue
            self._fuse(beta)
            count = self._count(0, n, allowed)
            out.append(Score(None if count.stopped else count.correct / n, count.images, time.perf_counter() - t0))
        return out

    def score_shard(self, beta: np.ndarray | bytes, start: int, stop: int, allowed: int | None = None) -> ShardCount:
        """Correct predictions of ``beta`` on val images [start, stop), a shard of whole batches.
        With ``allowed`` (``misses_allowed`` of the evaluation's threshold over all of val), the
        shard stops once its own misses exceed it: the evaluation then fails the threshold
        whatever the other shards count. ``beta`` may come as its float64 bytes
        (``pipeline.mixture.as_bytes``: the pool serialises a mixture once for all its shards)."""
        if isinstance(beta, bytes):
            beta = from_bytes(beta, self.beta_shape, error=EvaluatorInputError)
        if not (0 <= start < stop <= self.n_images and start % self.batch_size == 0
                and (stop == self.n_images or stop % self.batch_size == 0)):
            raise EvaluatorInputError(f"shard [{start}, {stop}) is not a range of whole batches of "
                                      f"{self.batch_size} within {self.n_images} images")
        t0 = time.perf_counter()
        if allowed is not None and allowed < 0:
            return ShardCount(0, 0, True, time.perf_counter() - t0)
        self._fuse(self._checked(beta, 0))
        count = self._count(start, stop, allowed)
        return ShardCount(count.correct, count.images, count.stopped, time.perf_counter() - t0)

    def predictions(self, beta: np.ndarray, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Per-image predicted classes of ``beta`` on val images [start, stop), batch by batch
        exactly as scoring runs them (on the CPU)."""
        return self.predictions_each([beta], start, stop)[0]

    def predictions_each(self, betas: Sequence[np.ndarray], start: int = 0,
                         stop: int | None = None) -> list[torch.Tensor]:
        """``predictions`` of each mixture, all checked first (an error names the mixture's
        index). The images come from the val shards this evaluator holds; rows no held shard
        covers are read for this call only, so nothing is kept beside the shards it serves."""
        stop = self.n_images if stop is None else stop
        checked = [self._checked(b, i) for i, b in enumerate(betas)]
        stored = self._held(start, stop)
        if stored is None:
            stored = self.val.rows(start, stop).to(self.device)
        out = []
        for beta in checked:
            self._fuse(beta)
            with self._forward_context():
                out.append(torch.cat([predictions(self.model(x), self.mask, self.class_map).cpu()
                                      for _, _, x in self._batches(start, stop, stored)]))
        return out

    @property
    def held_ranges(self) -> list[tuple[int, int]]:
        """The val ranges [start, stop) this evaluator keeps on its device (the shards it served)."""
        return sorted(self._shards)

    def fused_state_dict(self, beta: np.ndarray) -> dict[str, torch.Tensor]:
        """The model's full state dict (fused tensors + its other buffers) for ``beta``, on the CPU.
        Leaves the resident model holding this mixture."""
        self._fuse(self._checked(beta, 0))
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def forward_accuracy(self) -> float:
        """Val accuracy of the weights the resident model holds now (no fusing)."""
        return self._count(0, self.n_images, None).correct / self.n_images

    # -- internals --

    def _held(self, start: int, stop: int) -> torch.Tensor | None:
        """Val images [start, stop) from the ranges held on the device (a view of one, or the
        rows of several adjacent ones joined), or None when they do not cover it."""
        pieces, at = [], start
        for (a, b), t in sorted(self._shards.items()):
            if a <= at < b:
                pieces.append(t[at - a:min(stop, b) - a])
                at = min(stop, b)
                if at == stop:
                    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return None

    def _stored(self, start: int, stop: int) -> torch.Tensor:
        """Val images [start, stop) on the device in stored form; a range is moved there once."""
        got = self._held(start, stop)
        if got is None:
            got = self.val.rows(start, stop).to(self.device)
            self._shards[(start, stop)] = got
        return got

    def _forward_context(self):
        self.model.eval()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=self.device.type == "cuda" and self.dtype == torch.bfloat16)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast)
        return stack

    def _batches(self, start: int, stop: int, stored: torch.Tensor | None = None):
        stored = self._stored(start, stop) if stored is None else stored
        for b in range(start, stop, self.batch_size):
            e = min(b + self.batch_size, stop)
            yield b, e, self.val.prepare(stored[b - start:e - start])

    def _count(self, start: int, stop: int, allowed: int | None) -> ShardCount:
        """Correct predictions on [start, stop) for the resident weights; with ``allowed``,
        stopped once more than ``allowed`` images of the range are missed."""
        with self._forward_context():
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            for b, e, x in self._batches(start, stop):
                predicted = predictions(self.model(x), self.mask, self.class_map)
                correct += (predicted == self.labels[b:e]).sum()
                # a sync per batch only for threshold tests, whose early stop needs the count
                if allowed is not None and e < stop:
                    c = int(correct.item())
                    if (e - start) - c > allowed:
                        return ShardCount(c, e - start, True)
            total = int(correct.item())  # one device sync per shard otherwise
        return ShardCount(total, stop - start, allowed is not None and (stop - start) - total > allowed)

    def _checked(self, beta, index: int) -> np.ndarray:
        """The mixture at ``index`` of a batch, checked against this evaluator's shape."""
        return validate(beta, shape=self.beta_shape, index=index, component_names=self.component_names,
                        error=EvaluatorInputError)

    def _fuse(self, beta: np.ndarray) -> None:
        key = np.ascontiguousarray(beta, dtype=np.float64).tobytes()
        if key == self._fused:
            return  # the shards of one mixture on one evaluator fuse it once
        self._fused = None  # a failure half way leaves no claim on the buffer
        fuse_into(self._flat_views, self.working_set.row, beta, self.scratch)
        self._fused = key

    def _adopt_tensors(self, model: torch.nn.Module, flat_dtype: torch.dtype) -> torch.Tensor:
        """Re-point every mixed tensor at its slice of one flat buffer (starting from the model's
        current values), so writing the buffer writes the model in place."""
        flat = torch.empty(self.layout.n_params, dtype=flat_dtype, device=self.device)
        tensors = mixable_tensors(model)
        with torch.no_grad():
            for name, offset, shape in zip(self.layout.names, self.layout.offsets, self.layout.shapes):
                view = flat[offset:offset + shape.numel()].view(shape)
                view.copy_(tensors[name])
                tensors[name].data = view
        model.to(self.device)  # the other buffers; mixed tensors are already there
        for name, offset, shape in zip(self.layout.names, self.layout.offsets, self.layout.shapes):
            if shape.numel() and tensors[name].data_ptr() != flat[offset:].data_ptr():
                raise RuntimeError(f"{name!r} no longer views the evaluator's buffer after model.to()")
        return flat
