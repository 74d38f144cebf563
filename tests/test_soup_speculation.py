"""Speculative phase 1 and exact early stop: whatever the number of evaluators, the order they
finish in, a lost evaluator or an early-stopped threshold test, the search decides exactly what
the sequential search decides. Ray-free except one test through the real Ray pool."""
from __future__ import annotations

import collections
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch

from pipeline.config import SoupConfig, load_config
from pipeline.evaluate.evaluator import MixtureEvaluator
from pipeline.mixture import Score, Threshold
from pipeline.soup import baselines, mixing, mmms
from pipeline.soup.dispatch import Dispatcher

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from standin import ReferenceLike, SimulatedEvaluator, StandInHost, simulated_score  # noqa: E402  (test scaffolding)

pytestmark = pytest.mark.filterwarnings("ignore:COBYLA")

K, C = 24, 2
FUNCTION = ReferenceLike(K, C, seed=1, n_images=2000)
SEARCHES = {"NGOpt W=1": dict(optimizer="NGOpt", num_workers=1), "CMA W=4": dict(optimizer="CMA", num_workers=4)}


def cfg_of(search: str) -> SoupConfig:
    return SoupConfig(max_func_evals_per_dim=4, **SEARCHES[search])


def plain(function):
    """The stand-in as a plain ``evaluate`` callable: full accuracies, no early stop."""
    return lambda betas: [function(b) for b in betas]


@pytest.fixture(scope="module", params=list(SEARCHES))
def sequential(request):
    cfg = cfg_of(request.param)
    return request.param, mmms.phase1(FUNCTION.val_accs, C, plain(FUNCTION), cfg)


def assert_identical(a: mmms.Phase1Result, b: mmms.Phase1Result) -> None:
    assert np.array_equal(a.beta, b.beta) and a.val_acc == b.val_acc and a.chosen == b.chosen
    assert len(a.lambdas) == len(b.lambdas) and all(np.array_equal(x, y) for x, y in zip(a.lambdas, b.lambdas))
    assert a.decisions == b.decisions and a.trace == b.trace and a.n_evals == b.n_evals


def test_the_stand_in_decides_like_the_reference_log(sequential):
    _, result = sequential
    outcomes = collections.Counter(o for _, o, _ in result.decisions)
    assert set(outcomes) == {"short-circuit", "pass 1", "joined"}
    assert outcomes["short-circuit"] > outcomes["pass 1"] > 0 and outcomes["joined"] >= 2


@pytest.mark.parametrize("E", [1, 2, 4, 8])
@pytest.mark.parametrize("lose", [None, 30], ids=["all-alive", "one-lost"])
def test_speculative_phase1_is_the_sequential_search(sequential, E, lose):
    search, reference = sequential
    for seed in ((0, 1) if lose is None else (2,)):  # shuffled finishing orders
        pool = SimulatedEvaluator(FUNCTION, E, seed=seed, n_images=FUNCTION.n_images, lose_after=lose)
        seen = []
        result = mmms.phase1(FUNCTION.val_accs, C, pool, cfg_of(search), progress=seen.append)
        assert_identical(result, reference)
        assert pool.max_running == E  # every evaluator was used at once
        assert pool.alive == (E - 1 if lose and E > 1 else E)
        assert [p["evals"] for p in seen] == [n for n, _ in reference.trace]  # progress in sequential order
        c = result.cost
        if E > 1:  # speculation ran ahead, and some of it was dropped when a candidate joined
            assert c["evaluations"] > c["speculative_dropped"] > 0
        assert c["images_scored"] < c["evaluations"] * FUNCTION.n_images  # short-circuits stopped early


def test_a_joined_candidate_drops_what_was_tried_against_the_old_soup():
    cfg = cfg_of("NGOpt W=1")
    dispatcher = Dispatcher(SimulatedEvaluator(FUNCTION, 8, seed=3, n_images=FUNCTION.n_images))
    result = mmms.phase1(FUNCTION.val_accs, C, dispatcher, cfg)
    assert dispatcher.in_flight == 0  # dropped speculation still running was waited for
    c = result.cost
    # every evaluation either served the sequential search or was dropped speculation
    assert c["evaluations"] + c["memo_hits"] >= result.n_evals
    assert c["evaluations"] - c["speculative_dropped"] <= result.n_evals


def test_early_stop_decides_the_same_with_fewer_images(sequential):
    search, reference = sequential
    early = Dispatcher(FUNCTION)  # ReferenceLike.score: threshold tests stop early
    result = mmms.phase1(FUNCTION.val_accs, C, early, cfg_of(search))
    assert_identical(result, reference)
    assert early.cost.images < early.cost.evaluations * FUNCTION.n_images


def test_greedy_soup_with_early_stop_is_greedy_soup():
    full = baselines.greedy_soup(FUNCTION.val_accs, C, plain(FUNCTION))
    early = Dispatcher(FUNCTION)
    stopped = baselines.greedy_soup(FUNCTION.val_accs, C, early)
    assert np.array_equal(full[0], stopped[0]) and full[1] == stopped[1]
    assert early.cost.images < early.cost.evaluations * FUNCTION.n_images


# ---- the threshold's boundary ---------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 100, 2000, 26_000])
def test_needed_is_the_boundary_of_the_float_comparison(n):
    rng = np.random.default_rng(n)
    values = [c / n for c in rng.integers(0, n + 1, 20)] + list(rng.uniform(0, 1, 20))
    values += [0.998 * (c / n) for c in rng.integers(0, n + 1, 20)] + [0.0, 1.0, math.nextafter(1.0, 2.0)]
    for v in values + [math.nextafter(v, 2.0) for v in values] + [math.nextafter(v, -1.0) for v in values]:
        for strict in (False, True):
            t = Threshold(v, strict)
            needed = t.needed(n)
            assert all(t.passes(c / n) == (c >= needed) for c in range(max(0, needed - 3), min(n, needed + 3) + 1))
            assert (needed <= n) == t.passes(1.0)


def test_simulated_score_stops_only_when_the_threshold_is_unreachable():
    for acc in (0.5, 0.8, 0.9):
        for t in (Threshold(0.8), Threshold(0.8, strict=True)):
            s = simulated_score(acc, 1000, t)
            assert s.below == (not t.passes(acc))
            assert s.accuracy == (None if s.below else acc)
            assert s.images == 1000 or (s.below and s.images < 1000)


def evaluator_world():
    from test_mixture_evaluator import BATCH, make_world

    w = make_world("vit", level=1)
    return MixtureEvaluator(w.base, w.ingredients, w.components, w.images, w.labels, device="cpu", batch_size=BATCH)


def test_the_mixture_evaluator_stops_early_exactly():
    ev = evaluator_world()
    n = ev.images.shape[0]
    rng = np.random.default_rng(0)
    betas = [rng.dirichlet(np.ones(ev.n_ingredients), size=ev.beta_shape[1]).T for _ in range(2)]
    betas += [mixing.one_hot(*ev.beta_shape, j) for j in range(2)]
    full = ev.evaluate(betas)
    stopped_early = 0
    for beta, acc in zip(betas, full):
        # thresholds at, just above and just below the accuracy, and far from it
        for value in (acc, math.nextafter(acc, 2.0), math.nextafter(acc, -1.0), acc + 0.3, acc - 0.3, 0.998 * acc):
            for strict in (False, True):
                t = Threshold(value, strict)
                (s,) = ev.score([beta], [t])
                assert s.below == (not t.passes(acc)), (acc, value, strict)
                if not s.below:
                    assert s.accuracy == acc and s.images == n  # a pass is scored in full
                stopped_early += s.images < n
    assert stopped_early > 0
    assert [s.accuracy for s in ev.score(betas)] == full  # no threshold: plain accuracies


# ---- the real Ray pool ----------------------------------------------------------------------

def test_speculation_through_the_ray_pool_with_an_actor_lost(ray_local):
    import ray

    from pipeline.soup.pool import EvaluatorPool

    cfg = cfg_of("NGOpt W=1")
    small = ReferenceLike(12, C, seed=1, n_images=FUNCTION.n_images)
    reference = mmms.phase1(small.val_accs, C, plain(small), cfg)
    host = ray.remote(StandInHost).options(num_cpus=0, max_restarts=0)
    actors = [host.remote(12, C, 1, 0.0, small.n_images, die_after=3 if i == 0 else None) for i in range(3)]
    with EvaluatorPool(actors) as pool:
        pool.wait_ready(3)
        result = mmms.phase1(small.val_accs, C, pool, cfg)
        assert pool.in_service == 2  # one actor died mid-search; its evaluation went to another
    assert_identical(result, reference)
    assert result.cost["evaluators"] == 3 and result.cost["speculative_dropped"] > 0


# ---- progress, expected work, granularity ---------------------------------------------------

def test_expected_work_follows_the_observed_outcomes():
    cfg = SoupConfig(max_func_evals_per_dim=10)
    prior = mmms.expected_evaluations([], 10, 3, cfg)
    assert 10 <= prior < 10 * (1 + 3 * 3 * 10)  # below the upper bound
    all_short = mmms.expected_evaluations([("short-circuit", 1)] * 200, 10, 3, cfg)
    assert 10 <= all_short < 0.1 * prior
    assert mmms.expected_evaluations([("joined", 60)] * 5, 0, 3, cfg) == 0


def test_the_progress_line_shows_expected_work():
    from pipeline.soup.progress import ProgressPrinter

    lines = []
    ProgressPrinter(["a", "b"], lines.append)({"phase": 1, "ingredient": 1, "step": "pass 1", "evals": 458,
                                               "budget": 3158, "expected": 1210.4, "dropped": 12,
                                               "best_val": 0.81, "batch": 1, "seconds": 0.1})
    assert "evaluations 458 of ~1210 expected (at most 3158, 12 speculative dropped)" in lines[0]


def test_reference_granularity_is_image_tower_head_weight_head_bias():
    from pipeline.model.classifier import init_classifier
    from pipeline.model.components import components

    clf = init_classifier("frankensoup-demo-vit", 10)
    comps = components(clf, "reference")
    assert [c.name for c in comps] == ["visual", "head.weight", "head.bias"]
    assert sorted(p for c in comps for p in c.params) == sorted(n for n, _ in clf.named_parameters())
    assert load_config(None, ["soup.granularity=reference"]).soup.granularity == "reference"
    with pytest.raises(Exception, match="soup.granularity"):
        load_config(None, ["soup.granularity=reference-ish"])


def test_score_reports_below_not_an_accuracy():
    s = Score(None, 12)
    assert s.below and s.accuracy is None
    torch.manual_seed(0)  # keep torch's global state as the other tests expect


# ---- sharded evaluation on real evaluators; speculation only where it can help ---------------

def tensor_hash(state: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("search", list(SEARCHES))
def test_sharded_phase1_on_real_evaluators_is_bit_identical_for_any_S_and_E(search):
    """Real MixtureEvaluators behind the pool's own scheduling (InProcessPool): the fused
    model's tensor hash, and every decision, are the same for S in {1, 2, 3} (uneven shards) x
    E in {1, 2, 4}, with shuffled finish orders; one evaluator killed mid-shard changes nothing."""
    from test_mixture_evaluator import BATCH, make_world

    from pipeline.soup.pool import InProcessPool

    w = make_world("vit", level=1)
    teacher = copy.deepcopy(w.base)  # labels of the ingredients' average: mixing pays, candidates join
    teacher.load_state_dict({k: torch.stack([i[k] for i in w.ingredients]).mean(0) if v.is_floating_point() else v
                             for k, v in w.base.state_dict().items()})
    with torch.no_grad():
        w = w._replace(labels=teacher(w.images).argmax(1))
    cfg = SoupConfig(max_func_evals_per_dim=2, **SEARCHES[search])
    evaluators = [MixtureEvaluator(copy.deepcopy(w.base), w.ingredients, w.components, w.images, w.labels,
                                   device="cpu", batch_size=BATCH) for _ in range(4)]
    val_accs = evaluators[0].evaluate([mixing.one_hot(4, 3, j) for j in range(4)])
    reference = mmms.phase1(val_accs, 3, evaluators[0], cfg)
    fused = tensor_hash(mixing.fuse(w.ingredients, reference.beta, w.components))
    runs = [(S, E, None) for S in (1, 2, 3) for E in (1, 2, 4)] + [(3, 4, 5)]
    for seed, (S, E, lose) in enumerate(runs):
        pool = InProcessPool(evaluators[:E], n_shards=S, seed=seed, lose_after=lose)
        assert len(pool.bounds()) == S
        result = mmms.phase1(val_accs, 3, pool, cfg)
        assert_identical(result, reference)
        assert tensor_hash(mixing.fuse(w.ingredients, result.beta, w.components)) == fused, (S, E)
        if lose is not None:
            assert len(pool.lost) == 1 and pool.in_service == E - 1  # its shard ran elsewhere
    assert len(reference.chosen) > 1, "the test means something only if a candidate joins"


def test_no_speculation_when_the_memo_answers_the_whole_path(sequential):
    """A rerun on a full memo evaluates nothing (speculation does not run ahead of a path the
    memo answers); on a half-filled memo it still speculates where the memo cannot answer."""
    from pipeline.soup.dispatch import DictMemo

    search, reference = sequential
    memo = DictMemo()
    first = mmms.phase1(FUNCTION.val_accs, C, Dispatcher(SimulatedEvaluator(FUNCTION, 4, seed=0, n_images=FUNCTION.n_images), memo=memo),
                        cfg_of(search))
    assert_identical(first, reference)
    again = mmms.phase1(FUNCTION.val_accs, C, Dispatcher(SimulatedEvaluator(FUNCTION, 4, seed=1, n_images=FUNCTION.n_images), memo=memo),
                        cfg_of(search))
    assert_identical(again, reference)
    assert again.cost["evaluations"] == 0 and again.cost["memo_hits"] > 0

    # the first half of a sequential run's memo entries, in the order it made them
    full = DictMemo()
    mmms.phase1(FUNCTION.val_accs, C, Dispatcher(FUNCTION, memo=full), cfg_of(search))
    half = DictMemo()
    half._accs = dict(list(full._accs.items())[:len(full._accs) // 2])
    half._failed = dict(list(full._failed.items())[:len(full._failed) // 2])
    pool = SimulatedEvaluator(FUNCTION, 4, seed=2, n_images=FUNCTION.n_images)
    resumed = mmms.phase1(FUNCTION.val_accs, C, Dispatcher(pool, memo=half), cfg_of(search))
    assert_identical(resumed, reference)
    c = resumed.cost
    assert c["memo_hits"] > 0 and c["evaluations"] > 0
    assert pool.max_running > 1  # speculation ran where the memo could not answer
