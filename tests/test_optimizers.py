"""Every accepted optimizer is deterministic from its seed alone: run twice in one process with
unrelated np.random draws between its asks, and in two fresh processes, it asks the same
points and ends at the same result. NGOpt is checked where the config lets it run: one worker,
the dimensions of granularities 0-3 and the phases' per-dimension budgets (it picks Cobyla)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import NGOPT_MAX_EVALS_PER_DIM, OPTIMIZERS, ConfigError, load_config
from pipeline.soup import mmms

# (optimizer, W, dimension, evaluations per dimension): the demo's component counts at
# granularities 0, 1 and 2-3 and phase 2's K x C; NGOpt up to the cap of 50 per dimension
CASES = [("Cobyla", 1, 3, 30), ("CMA", 4, 3, 10), ("CMA", 2, 14, 2), ("TwoPointsDE", 4, 3, 10),
         ("TwoPointsDE", 2, 14, 2), ("NGOpt", 1, 1, 30), ("NGOpt", 1, 3, NGOPT_MAX_EVALS_PER_DIM),
         ("NGOpt", 1, 14, 4), ("NGOpt", 1, 42, 2)]


def search_fingerprint(name: str, W: int, d: int, per_dim: int, disturb: bool) -> str:
    """sha256 over every point asked and the result of one search on a fixed bowl; with
    ``disturb`` the loss draws from np.random's global state, as other code in the process may."""
    centre = np.linspace(0.35, 0.65, d)
    asked = []

    def loss_of_batch(xs):
        if disturb:
            np.random.seed(len(asked))  # what a library seeding the global state would do
            np.random.rand(7)
        asked.extend(np.asarray(x, dtype=np.float64).tobytes() for x in xs)
        return [float(((x - centre) ** 2).sum()) for x in xs]

    x, fx, n = mmms.minimise(loss_of_batch, np.full(d, 0.5), 0.0, 1.0, d * per_dim, optimizer=name,
                             num_workers=W, seed=123456789)
    h = hashlib.sha256(b"".join(asked))
    h.update(np.asarray(x, dtype=np.float64).tobytes() + repr((fx, n)).encode())
    return h.hexdigest()


@pytest.mark.filterwarnings("ignore:COBYLA")
@pytest.mark.parametrize("name,W,d,per_dim", CASES)
def test_each_accepted_optimizer_ignores_the_global_numpy_state(name, W, d, per_dim):
    first = search_fingerprint(name, W, d, per_dim, disturb=False)
    np.random.seed(99)  # the global state differs from the first run's
    assert search_fingerprint(name, W, d, per_dim, disturb=True) == first


def test_ngopt_picks_cobyla_wherever_the_config_lets_it_run():
    for d in (1, 3, 14, 42, 152):
        for per_dim in (1, 30, NGOPT_MAX_EVALS_PER_DIM):
            opt = mmms.make_optimizer("NGOpt", np.full(d, 0.5), 0.0, 1.0, d * per_dim, 1, 0)
            assert opt.picked == "Cobyla", (d, per_dim, opt.picked)


def test_two_fresh_processes_search_alike_and_importing_nevergrad_leaves_the_random_stream_alone():
    code = ("import json, sys, numpy as np; np.random.seed(int(sys.argv[1])); sys.path.insert(0, 'tests'); "
            "from pipeline.soup.mmms import nevergrad; nevergrad(); first = np.random.rand(); "
            "from test_optimizers import CASES, search_fingerprint; "
            "print(json.dumps([first, [search_fingerprint(*c, disturb=True) for c in CASES]]))")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", code, str(seed)], env=env, text=True,
                              stdout=subprocess.PIPE) for seed in (1, 2)]
    runs = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    assert runs[0][1] == runs[1][1] == [search_fingerprint(*c, disturb=False) for c in CASES]
    assert [r[0] for r in runs] == [np.random.RandomState(seed).rand() for seed in (1, 2)]


def test_other_optimizers_are_refused_at_load_listing_the_accepted():
    for name in ("NgIoh", "Wiz", "RandomSearch", "NoSuchOptimizer"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"soup.optimizer={name}"])
        assert len(str(e.value).splitlines()) == 1
        assert f"soup.optimizer: Value error, '{name}' is not an accepted optimizer: use one of " in str(e.value)
        assert ", ".join(OPTIMIZERS) in str(e.value)
    with pytest.raises(ConfigError, match=r"'NGOpt' with 60 evaluations per dimension.*above 50"):
        load_config(None, ["soup.optimizer=NGOpt", "soup.num_workers=1", "soup.phase2.evals_per_dim=60"])


def test_an_own_random_state_runs_on_across_entries_and_leaves_the_callers_alone():
    own = mmms.OwnRandomState(7)
    np.random.seed(1)
    with own.active():
        a = np.random.rand(3)
    caller = np.random.rand()  # the caller's stream goes on as if nothing happened in between
    np.random.seed(1)
    assert caller == np.random.rand()
    np.random.seed(2)  # whatever the caller does to its own state
    with own.active():
        b = np.random.rand(3)
    reference = np.random.RandomState(7)
    assert np.array_equal(a, reference.rand(3)) and np.array_equal(b, reference.rand(3))  # not reseeded
