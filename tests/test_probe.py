"""Evaluators must agree (pipeline/soup/probe.py): each evaluator joining the soup's pool
predicts the probe mixtures on the probe images bit for bit like the first, or the soup stops
naming both; the agreed predictions' fingerprint keys the search memo."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import EVALUATED_OVERRIDES, clone_output
from pipeline.soup import pool as pool_lib
from pipeline.soup.inputs import load_inputs, memo_context, split_names
from pipeline.soup.probe import EvaluatorsDisagree, ProbeCheck, probe_mixtures

HALF_CPU = "soup.evaluator_resources.cpu=0.5"


def test_probe_mixtures_are_a_one_hot_and_a_mixed_one():
    one_hot, mixed = probe_mixtures(3, 4)
    assert np.array_equal(one_hot[0], np.ones(4)) and not one_hot[1:].any()
    assert np.allclose(mixed.sum(axis=0), 1.0) and (mixed[:2] > 0).all() and len({*mixed[0]}) == 4
    # more ingredients leave the probe as it was (its fingerprint is in the memo's context)
    for more, fewer in zip(probe_mixtures(5, 4), (one_hot, mixed)):
        assert np.array_equal(more[:3], fewer) and not more[3:].any()


def _pool_of(cfgs, ids, n_components):
    val, _, _ = split_names(cfgs[0])
    actors = [a for c in cfgs for a in pool_lib.start_evaluators(c, val, ids, num_evaluators=1)]
    check = ProbeCheck(len(ids), n_components)
    return pool_lib.EvaluatorPool(actors, on_admit=[check.admit]), check


def test_an_evaluator_that_predicts_otherwise_stops_the_soup_naming_both(evaluated_demo, ray_local, tmp_path):
    cfg = clone_output(evaluated_demo, tmp_path / "out", *EVALUATED_OVERRIDES, HALF_CPU)
    other = clone_output(evaluated_demo, tmp_path / "other", *EVALUATED_OVERRIDES, HALF_CPU,
                         "evaluate.ingredient_dtype=bfloat16")
    inputs = load_inputs(cfg)
    same, check = _pool_of([cfg, cfg], inputs.ids, len(inputs.components))
    with same:
        same.wait_ready(2)  # two alike: both admitted
        assert same.in_service == 2 and len(check.fingerprint) == 32
        fingerprint = check.fingerprint
    differ, _ = _pool_of([cfg, other], inputs.ids, len(inputs.components))
    with differ, pytest.raises(EvaluatorsDisagree) as e:
        differ.wait_ready(2)
    line = str(e.value)
    assert len(line.splitlines()) == 1 and "evaluators disagree on the probe mixtures" in line
    assert "dtype float32" in line and "dtype bfloat16" in line and line.count("node ") == 2
    assert line.count(ray_local.get_runtime_context().get_node_id()) == 2 and "device cpu" in line
    # the memo made on these evaluators is not the memo of evaluators that predict otherwise
    val, _, _ = split_names(cfg)
    assert memo_context(cfg, inputs.components, val, fingerprint) != memo_context(cfg, inputs.components, val,
                                                                                   "0" * 32)
