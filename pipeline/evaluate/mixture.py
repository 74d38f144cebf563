"""The fast mixture evaluator: score many mixtures (beta matrices) on one resident val split.

All ingredients are stacked once into a ``[K, n_params]`` matrix on the device, laid out by
component so each component is one contiguous column range. The one resident model's
parameters are views into a flat buffer with the same layout, so fusing a mixture is a sum
over the ingredients it uses, per component, written straight into the model:

    flat[slice_c] = sum_{j: beta[j, c] != 0} beta[j, c] * W[j, slice_c]

followed by a forward pass over preprocessed images that already sit on the device.
No Ray here: the Ray actor wraps this class. See docs/evaluator.md.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import beta as beta_lib
from ..errors import UserError
from .scoring import EvaluatorInputError, predictions, scoring_mask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# elements of a low-precision weight block upcast to float32 at a time (64 MiB of float32)
UPCAST_BLOCK_ELEMENTS = 1 << 24
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


def _component_tensors(comp) -> tuple[str, ...]:
    # components.Component may list floating buffers to mix alongside its parameters
    return tuple(comp.params) + tuple(getattr(comp, "buffers", ()))


def flat_layout(model: torch.nn.Module, components: Sequence) -> FlatLayout:
    """Lay the mixed tensors out by component: every parameter in exactly one component, floating
    buffers where a component lists them (the others stay the model's own)."""
    tensors = mixable_tensors(model)
    params = {n for n, _ in model.named_parameters()}
    if not params:
        raise EvaluatorInputError("the model has no parameters to mix")
    owner: dict[str, str] = {}
    names, shapes, offsets, slices = [], [], [], []
    offset = 0
    for comp in components:
        start = offset
        for name in _component_tensors(comp):
            if name not in tensors:
                raise EvaluatorInputError(f"component {comp.name!r} names {name!r}, which is not a parameter "
                                          "or floating buffer of the model")
            if name in owner:
                raise EvaluatorInputError(f"tensor {name!r} is in components {owner[name]!r} and {comp.name!r}")
            owner[name] = comp.name
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


def required_bytes(n_ingredients: int, n_params: int, dtype: str | torch.dtype,
                   images: torch.Tensor | None) -> int:
    """Device memory the evaluator holds: the ingredient matrix, one float32 fused model, the
    images, and (low precision only) the float32 block that fusion upcasts into.
    Forward-pass activations are not counted: leave headroom for them."""
    dt = ingredient_dtype(dtype)
    element = torch.empty((), dtype=dt).element_size()
    upcast = UPCAST_BLOCK_ELEMENTS * 4 if dt != torch.float32 else 0
    image_bytes = 0 if images is None else images.numel() * images.element_size()
    return n_ingredients * n_params * element + n_params * 4 + upcast + image_bytes


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


# ---- ingredients ----------------------------------------------------------------------------

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


def stack_ingredients(ingredients: Sequence[Mapping[str, torch.Tensor]], layout: FlatLayout,
                      known_keys: set[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``[K, n_params]`` ingredient matrix, each row in the layout's order. Each ingredient
    is read once, so a lazily loading Sequence keeps only one state dict in host memory."""
    weights = torch.empty((len(ingredients), layout.n_params), dtype=dtype, device=device)
    for j, state in enumerate(ingredients):
        _check_ingredient(j, state, layout, known_keys)
        row = weights[j]
        for name, offset, shape in zip(layout.names, layout.offsets, layout.shapes):
            row[offset:offset + shape.numel()].copy_(state[name].reshape(-1))
        # a NaN would poison every mixture that touches this ingredient (0 * NaN = NaN)
        if not torch.isfinite(row).all():
            raise EvaluatorInputError(_first_non_finite(j, row, layout))
    return weights


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


def mix_into(out: torch.Tensor, weights: torch.Tensor, coeffs: torch.Tensor) -> None:
    """out = sum_j coeffs[j] * weights[j] over the non-zero coeffs only, in row order, each term
    and the sum in float32 (the very arithmetic of ``pipeline.soup.mixture.fuse_many``). Rows a
    mixture does not use are never touched, so the fused weights depend only on the rows it
    mixes — not on how many ingredients are resident — which is what lets the search memo key
    a mixture by its non-zero rows. A one-hot coeffs gives its row bit for bit."""
    rows = torch.nonzero(coeffs).flatten().tolist()
    acc = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    if not rows:
        acc.zero_()
    for i, j in enumerate(rows):
        term = weights[j].float() * coeffs[j]
        if i == 0:
            acc.copy_(term)
        else:
            acc.add_(term)
    if acc is not out:
        out.copy_(acc)


def fuse_into(flat: torch.Tensor, weights: torch.Tensor, beta_t: torch.Tensor,
              slices: Sequence[tuple[int, int]]) -> None:
    """Write the mixture ``beta_t`` ([C, K], row c = beta[:, c]) into the flat buffer."""
    with torch.no_grad(), ieee_float32_matmul(flat.device):
        for c, (start, stop) in enumerate(slices):
            if stop > start:
                mix_into(flat[start:stop], weights[:, start:stop], beta_t[c])


# ---- scoring --------------------------------------------------------------------------------

def _check_val_tensors(images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() < 1 or images.shape[0] == 0:
        raise EvaluatorInputError("images must be a non-empty tensor [N, ...]")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise EvaluatorInputError(f"labels must be an integer tensor of shape ({images.shape[0]},), "
                                  f"got {getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- threshold tests ------------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    """A search's accept test on a mixture's val accuracy: ``acc >= value`` (``acc > value`` when
    ``strict``). Phase 1's short-circuit is ``Threshold(tau * accA)``, greedy soup's
    ``Threshold(best, strict=True)``: the very float comparisons of the sequential code."""
    value: float
    strict: bool = False

    def passes(self, accuracy: float) -> bool:
        return accuracy > self.value if self.strict else accuracy >= self.value

    def needed(self, n: int) -> int:
        """The fewest correct images out of n that pass, judged on ``correct / n`` exactly as
        the accuracy is computed (n + 1 when none pass): c / n is monotone in c, so this is
        the boundary of the float comparison itself, not an approximation of it."""
        c = min(max(int(self.value * n), 0), n)
        while c > 0 and self.passes((c - 1) / n):
            c -= 1
        while c <= n and not self.passes(c / n):
            c += 1
        return c


@dataclass(frozen=True)
class Score:
    """One evaluation: the val accuracy, or None when a threshold test stopped early because
    the threshold could no longer be reached; ``images`` = images actually scored."""
    accuracy: float | None
    images: int
    seconds: float = 0.0

    @property
    def below(self) -> bool:
        return self.accuracy is None


# ---- the evaluator --------------------------------------------------------------------------

class MixtureEvaluator:
    """``evaluate(list of beta [K, C]) -> list of val accuracies`` on one resident model.

    The evaluator owns ``model``: its parameters (and the floating buffers a component lists)
    become views into the evaluator's flat buffer; do not move or cast the model afterwards.
    Buffers no component lists stay the model's own.
    """

    def __init__(self, model: torch.nn.Module, ingredients: Sequence[Mapping[str, torch.Tensor]],
                 components: Sequence, images: torch.Tensor, labels: torch.Tensor, *,
                 dtype: str = "float32", device: str | torch.device | None = None,
                 batch_size: int = 256, class_mask: torch.Tensor | None = None,
                 class_map: torch.Tensor | None = None, threads: int | None = None,
                 memory_limit_gb: float | None = None):
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
        _check_val_tensors(images, labels)
        mask = scoring_mask(class_mask, class_map)

        k, n = len(ingredients), self.layout.n_params
        detail = (f"{k} ingredients x {n:,} params in {str(self.dtype).removeprefix('torch.')} "
                  f"+ {images.shape[0]:,} images")
        check_fits(required_bytes(k, n, self.dtype, images), self.device, memory_limit_gb, detail=detail)

        known_keys = set(model.state_dict().keys())
        self.weights = stack_ingredients(ingredients, self.layout, known_keys, self.dtype, self.device)
        self.flat = self._adopt_tensors(model, flat_dtype)
        self.model = model
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.mask = None if mask is None else mask.to(self.device)
        self.class_map = None if class_map is None else class_map.to(self.device, torch.long)

    # -- public API --

    @property
    def n_ingredients(self) -> int:
        return self.weights.shape[0]

    @property
    def component_names(self) -> tuple[str, ...]:
        return self.layout.component_names

    @property
    def beta_shape(self) -> tuple[int, int]:
        return (self.n_ingredients, len(self.layout.component_slices))

    def evaluate(self, betas: Sequence[np.ndarray]) -> list[float]:
        """Val accuracy of each mixture, in order. Every mixture is checked before any is run."""
        checked = [self._checked(b, i) for i, b in enumerate(betas)]
        accuracies = []
        for beta in checked:
            self._fuse(beta)
            accuracies.append(self.forward_accuracy())
        return accuracies

    __call__ = evaluate

    def score(self, betas: Sequence[np.ndarray], thresholds: Sequence[Threshold | None] | None = None) -> list[Score]:
        """Like ``evaluate``, but a mixture with a threshold is scored in batches and stopped as
        soon as ``correct + images left < needed``: it is then reported below the threshold
        (accuracy None). A mixture that can still pass is scored in full."""
        thresholds = list(thresholds) if thresholds is not None else [None] * len(betas)
        if len(thresholds) != len(betas):
            raise EvaluatorInputError(f"{len(thresholds)} thresholds for {len(betas)} mixtures")
        checked = [self._checked(b, i) for i, b in enumerate(betas)]
        out = []
        for beta, threshold in zip(checked, thresholds):
            t0 = time.perf_counter()
            self._fuse(beta)
            accuracy, images = self._count(threshold)
            out.append(Score(accuracy, images, time.perf_counter() - t0))
        return out

    def fused_state_dict(self, beta: np.ndarray) -> dict[str, torch.Tensor]:
        """The model's full state dict (fused tensors + its other buffers) for ``beta``, on the CPU.
        Leaves the resident model holding this mixture."""
        self._fuse(self._checked(beta, 0))
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def forward_accuracy(self) -> float:
        """Val accuracy of the weights the resident model holds now (no fusing)."""
        return self._count(None)[0]

    def _count(self, threshold: Threshold | None) -> tuple[float | None, int]:
        """(correct / n, n) for the resident weights; with a threshold, (None, images scored)
        once the misses make it unreachable."""
        self.model.eval()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=self.device.type == "cuda" and self.dtype == torch.bfloat16)
        n = self.images.shape[0]
        needed = None if threshold is None else threshold.needed(n)
        if needed is not None and needed > n:
            return None, 0  # no count of correct images can pass
        with torch.inference_mode(), autocast:
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                logits = self.model(self.images[start:stop])
                predicted = predictions(logits, self.mask, self.class_map)
                correct += (predicted == self.labels[start:stop]).sum()
                # a sync per batch only for threshold tests, whose early stop needs the count
                if needed is not None and stop < n and correct.item() + (n - stop) < needed:
                    return None, stop
            # one device sync per evaluation, not per batch
            total = correct.item()
            if needed is not None and total < needed:
                return None, n
            return total / n, n

    # -- internals --

    def _checked(self, beta, index: int) -> np.ndarray:
        """The mixture at ``index`` of a batch, checked against this evaluator's shape."""
        return beta_lib.validate(beta, shape=self.beta_shape, index=index, component_names=self.component_names,
                                 error=EvaluatorInputError)

    def _fuse(self, beta: np.ndarray) -> None:
        # torch.tensor copies: arrays that arrive through Ray are read-only
        beta_t = torch.tensor(beta.T, dtype=torch.float32).contiguous().to(self.device)
        fuse_into(self.flat, self.weights, beta_t, self.layout.component_slices)

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
