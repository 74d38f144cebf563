"""The soup-method interface and SOUP_METHODS (every registered method by name). Every way of
making one classifier from the ingredients is a ``SoupMethod``: a name, the settings it reads, an upper bound on its val
evaluations, and ``run(context) -> MethodResult``. Registering it is all it takes: the soup
stage runs every registered method in registration order, and the report, the plots and the
dry run list them from here. A method's model is a mixture (``beta``, ingredients x components)
unless it says otherwise (``state``: a fused state dict; ``ensemble``: rows whose logits are
averaged)."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ... import methodspec
from ...config import Config, SoupConfig
from ...errors import UserError
from ...keys import result_settings
from ...methodspec import MethodSettings, MethodSpec
from ..dispatch import Dispatcher, Evaluator, dispatcher_of

Log = Callable[[str], None]


class MethodError(UserError, ValueError):
    """A method registered twice, or one whose result is not a model."""


@dataclass
class MethodResult:
    """What a method made. Exactly one of ``beta``, ``state`` and ``ensemble`` is the model."""
    beta: np.ndarray | None = None          # a mixture: rows = ingredients, columns = components
    search_val: float | None = None          # the val accuracy its own search measured, if it searched
    summary: str = ""                        # one console line
    details: Any = None                      # the method's own record (e.g. mmms.Phase1Result)
    report: dict = field(default_factory=dict)  # top-level report.json fields it adds
    state: dict[str, torch.Tensor] | None = None  # a fused classifier made otherwise (WiSE-FT)
    ensemble: list[int] | None = None        # ingredient rows whose logits are averaged
    cost: dict = field(default_factory=dict)  # what the evaluators did for it (filled by run_methods)
    trace: list | None = None                # [[evaluations, best val so far], ...] of a method that searched

    def __post_init__(self):
        kinds = sum(x is not None for x in (self.beta, self.state, self.ensemble))
        if kinds != 1:
            raise MethodError(f"a method's result is one model (beta, state or ensemble), got {kinds}")


@dataclass
class MethodContext:
    """What a method may use: the settings, the ingredients' val accuracies (row order), the
    number of components, the mixture evaluator on val, and what earlier methods made."""
    cfg: Config
    val_accs: list[float]
    n_components: int
    evaluate: Dispatcher
    progress: Callable[[dict], None] | None
    log: Log
    results: dict[str, MethodResult]
    ids: list[str]                       # the ingredients' ids, in row order
    models: Any = None  # the stage's model services (fused-model scoring, the zero-shot head): ModelServices

    @property
    def soup(self) -> SoupConfig:
        return self.cfg.soup

    @property
    def K(self) -> int:
        return len(self.val_accs)


class SoupMethod:
    """Subclass, set ``name``, implement ``run``; decorate with ``@register``. Its settings are a
    ``MethodSettings`` subclass (``Settings``), read from ``soup.methods.<name>``; ``version``
    goes into the soup's key with them, so bump it when a code change changes the result."""
    name: ClassVar[str]
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    version: ClassVar[int] = 1
    one_model: ClassVar[bool] = True        # False: the result is not one set of weights (never published)
    summary: ClassVar[str] = ""             # what it is, one line (docs, report.md)
    marker: ClassVar[tuple[str, str]] = ("o", "tab:purple")  # plot marker and colour
    needs: ClassVar[tuple[str, ...]] = ()   # methods whose results it reads (registered before it)
    needs_models: ClassVar[bool] = False    # uses the stage's model services (not the mixture evaluator alone)

    def options(self, soup: SoupConfig) -> MethodSettings:
        """Its own settings, ``soup.methods.<name>``."""
        return methodspec.settings_of(soup.methods, self.name)

    def enabled(self, soup: SoupConfig) -> bool:
        """Whether the run makes it: ``soup.methods.<name>.enabled``."""
        return self.options(soup).enabled

    def settings(self, soup: SoupConfig) -> dict:
        """The soup-level settings it reads besides its own (the search's, for mmms)."""
        return {}

    def content(self, soup: SoupConfig) -> dict:
        """Content hashes of files its settings name (a setting that is a URI is keyed by what
        it holds, never by where it is)."""
        return {}

    def key(self, soup: SoupConfig) -> dict:
        """Its part of the soup's key: name, version and every setting that changes its result."""
        own = result_settings(self.options(soup))
        return {"version": self.version, "settings": {**own, **self.settings(soup)}, **self.content(soup)}

    def budget(self, soup: SoupConfig, n_ingredients: int, n_components: int) -> int:
        """An upper bound on its mixture evaluations on val (the dry run's plan)."""
        return 0

    def run(self, ctx: MethodContext) -> MethodResult:
        raise NotImplementedError


@dataclass
class Interpolation:
    """The grid point a zero-shot-to-best-individual interpolation picked on val."""
    best: int                     # the best individual's row (the second end)
    point: Any                    # the grid point with the best val accuracy (ties: the first)
    val: float                    # its val accuracy
    state: dict[str, torch.Tensor]  # its fused classifier
    by_point: dict                # every grid point's val accuracy, in grid order


def interpolate_on_val(ctx: MethodContext, points: Sequence, mixture: Callable[[Any], np.ndarray],
                       label: Callable[[Any], str], components=None) -> Interpolation:
    """WiSE-FT and LiNeS: the ends (zero-shot, best individual), each grid point's mixture of the
    two (``mixture(point)``, 2 x components; the soup's components unless ``components``) fused
    by the reference fusion and scored on val; the first point with the best val accuracy."""
    best = int(np.flatnonzero(ctx.results["best_individual"].beta[:, 0])[0])
    models = ctx.models
    ends = [models.zero_shot_state(), models.ingredient_state(best)]
    # each point's model is made when scoring needs it and dropped after: the driver holds the
    # two ends and one point, not the grid (15 ViT-B-32 classifiers would be ~9 GB)
    states = {label(p): functools.partial(models.fuse, ends, mixture(p), components) for p in points}
    accs = models.val_accuracy(states)
    by_point = {p: accs[label(p)] for p in points}
    order = list(by_point)
    point = max(order, key=lambda p: (by_point[p], -order.index(p)))  # ties: the first
    return Interpolation(best, point, by_point[point], states[label(point)](), by_point)


SOUP_METHODS: dict[str, SoupMethod] = {}


def register(cls: type[SoupMethod]) -> type[SoupMethod]:
    """Add a method to SOUP_METHODS (class decorator)."""
    name = getattr(cls, "name", None)
    if not name or name == "zero_shot":
        raise MethodError(f"{cls.__name__} needs a name other than 'zero_shot'")
    if name in SOUP_METHODS and type(SOUP_METHODS[name]) is not cls:
        raise MethodError(f"soup method {name!r} is registered twice ({type(SOUP_METHODS[name]).__name__}, {cls.__name__})")
    missing = [n for n in cls.needs if n not in SOUP_METHODS]
    if missing:
        raise MethodError(f"soup method {name!r} needs {missing}, which are not registered before it")
    later = [n for n in cls.needs if SOUP_METHODS[n].needs_models and not cls.needs_models]
    if later:
        raise MethodError(f"soup method {name!r} searches with the mixture evaluator, which is done before "
                          f"{later} run: it cannot need them")
    if "enabled" not in cls.Settings.model_fields or not issubclass(cls.Settings, MethodSettings):
        raise MethodError(f"soup method {name!r}: its Settings must subclass pipeline.methodspec.MethodSettings")
    methodspec.declare(MethodSpec(name, cls.Settings, int(cls.version), tuple(cls.needs), bool(cls.one_model),
                                  str(cls.summary), tuple(cls.marker)))
    SOUP_METHODS[name] = cls()
    return cls


def unregister(name: str) -> None:
    SOUP_METHODS.pop(name, None)
    methodspec.withdraw(name)


def methods() -> list[SoupMethod]:
    """Every registered method, built-in and installed plugins, in registration order (the
    report's row order)."""
    methodspec.load()
    return list(SOUP_METHODS.values())


def enabled_methods(soup: SoupConfig) -> list[SoupMethod]:
    return [m for m in methods() if m.enabled(soup)]


def method_keys(soup: SoupConfig) -> dict[str, dict]:
    """Each enabled method's part of the soup key: adding, changing or switching one changes the key."""
    return {m.name: m.key(soup) for m in enabled_methods(soup)}


@dataclass
class SearchResult:
    """Every method's result, in registration order."""
    results: dict[str, MethodResult]

    @property
    def betas(self) -> dict[str, np.ndarray]:
        return {n: r.beta for n, r in self.results.items() if r.beta is not None}

    @property
    def search_val(self) -> dict[str, float]:
        return {n: r.search_val for n, r in self.results.items() if r.search_val is not None}

    @property
    def cost(self) -> dict[str, dict]:
        return {n: r.cost for n, r in self.results.items()}

    @property
    def timings(self) -> dict[str, float]:
        return {n: r.cost["wall_seconds"] for n, r in self.results.items()}

    def report_fields(self) -> dict:
        out: dict = {}
        for r in self.results.values():
            out.update(r.report)
        out["traces"] = {n: [list(p) for p in r.trace] for n, r in self.results.items() if r.trace}
        return out

    def __getitem__(self, name: str) -> MethodResult:
        return self.results[name]


def run_methods(cfg: Config, evaluate: Evaluator, val_accs: Sequence[float], n_components: int,
                progress=None, log: Log = print, ids: Sequence[str] | None = None, models=None,
                mixtures_done: Callable[[], None] | None = None) -> SearchResult:
    """Every registered method through ``evaluate`` (a plain callable, an asynchronous evaluator
    such as the Ray pool, or a Dispatcher); each method's evaluator work is costed. The methods
    that search with the mixture evaluator run first, in registration order; then
    ``mixtures_done()`` (the stage frees the evaluators' CPUs and GPUs there) and the methods
    that use the stage's model services, which are skipped when ``models`` is None (the
    mixture-only search the tests and benchmarks run). Results come in registration order."""
    evaluate = dispatcher_of(evaluate)
    ids = list(ids) if ids is not None else [str(j) for j in range(len(val_accs))]
    ctx = MethodContext(cfg, [float(a) for a in val_accs], n_components, evaluate, progress, log, {}, ids, models)
    enabled = enabled_methods(cfg.soup)
    for group in ([m for m in enabled if not m.needs_models], [m for m in enabled if m.needs_models]):
        if group and group[0].needs_models:
            if mixtures_done is not None:
                mixtures_done()
            if models is None:
                break
        for method in group:
            before, t = evaluate.cost.copy(), time.time()
            result = method.run(ctx)
            result.cost = evaluate.cost.since(before).report(time.time() - t, evaluate.size)
            ctx.results[method.name] = result
            if result.summary:
                log(f"soup: {result.summary}")
    return SearchResult({m.name: ctx.results[m.name] for m in enabled if m.name in ctx.results})
