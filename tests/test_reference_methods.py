"""Model Stock and LiNeS, Ray-free: Model Stock against an independent numpy implementation of
the paper's formula on small checkpoints (parallel deltas: t = 1; orthogonal: t = 0; a zero
delta; a negative cosine, not clamped); LiNeS's lambdas by depth and its ends bit for bit; the
methods' settings under soup.methods.<name> (old keys as aliases, one-line errors) and their
place in the soup's key."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.soup.methods import method_keys
from pipeline.soup.methods.lines import DEFAULT_GRID, beta_of, lambdas
from pipeline.soup.methods.model_stock import model_stock


def numpy_model_stock(w0: np.ndarray, members: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The paper's formula, written again: mean pairwise cosine of the deltas over every pair
    (0 for a pair with a zero delta), t = N c / (1 + (N - 1) c), t mean + (1 - t) w0."""
    deltas = [(w.astype(np.float32) - w0.astype(np.float32)).astype(np.float64).ravel() for w in members]
    cosines = []
    for a, b in itertools.combinations(deltas, 2):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cosines.append(0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
    n = len(members)
    c = float(np.mean(cosines))
    t = n * c / (1 + (n - 1) * c) if 1 + (n - 1) * c > 0 else 0.0
    mean = np.mean([w.astype(np.float64) for w in members], axis=0)
    return (t * mean + (1 - t) * w0.astype(np.float64)).astype(np.float32), t


def states(*arrays: np.ndarray) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(a, dtype=torch.float32), "steps": torch.tensor(3)} for a in arrays]


W0 = np.array([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], dtype=np.float32)
D = np.array([[0.1, 0.0, -0.2], [0.3, 0.05, 0.0]], dtype=np.float32)
E = np.array([[0.2, 0.1, 0.1], [-0.05, 0.0, 0.4]], dtype=np.float32)
E = E - (E * D).sum() / (D * D).sum() * D  # orthogonal to D


@pytest.mark.parametrize("case, members, t_expected", [
    ("parallel", [W0 + D, W0 + 3 * D], 1.0),
    ("orthogonal", [W0 + D, W0 + E], 0.0),
    ("zero delta", [W0 + D, W0.copy()], 0.0),
    ("negative cosine", [W0 + D, W0 - 0.5 * D + E], None),
    ("three members", [W0 + D, W0 + E, W0 + 0.5 * D + 2 * E], None),
])
def test_model_stock_matches_an_independent_implementation(case, members, t_expected):
    start, *ms = states(W0, *members)
    merged, ts = model_stock(start, iter(ms), ["w"])
    expected, t = numpy_model_stock(W0, members)
    assert ts["w"] == pytest.approx(t, abs=1e-6)
    np.testing.assert_allclose(merged["w"].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert merged["w"].dtype == torch.float32 and torch.equal(merged["steps"], start["steps"])
    if t_expected is not None:
        assert ts["w"] == pytest.approx(t_expected, abs=1e-6)
    if case == "parallel":  # t = 1: the members' mean
        np.testing.assert_allclose(merged["w"].numpy(), (members[0] + members[1]) / 2, rtol=1e-6)
    if case in ("orthogonal", "zero delta"):  # t = 0: the start
        np.testing.assert_allclose(merged["w"].numpy(), W0, atol=1e-7)
    if case == "negative cosine":  # the authors do not clamp: t < 0 moves away from the members
        assert ts["w"] < 0


def test_model_stock_leaves_a_tensor_no_member_changed_at_the_start():
    start, a, b = states(W0, W0.copy(), W0.copy())
    merged, ts = model_stock(start, iter([a, b]), ["w"])
    assert ts["w"] == 0.0 and torch.equal(merged["w"], start["w"])


def test_lines_lambdas_grow_with_depth_from_the_stem_to_the_head():
    names = ["stem", "block.0", "block.1", "block.2", "block.3", "head"]
    lam = lambdas(names, 0.2, 0.6)
    np.testing.assert_allclose(lam, [0.2, 0.2, 0.4, 0.6, 0.8, 0.8])
    beta = beta_of(lam)
    np.testing.assert_allclose(beta.sum(axis=0), 1.0)
    assert len(DEFAULT_GRID) == 15 and (1.0, 0.0) in DEFAULT_GRID and (0.0, 0.0) in DEFAULT_GRID
    assert all(0 <= a <= 1 and 0 <= a + b <= 1 for a, b in DEFAULT_GRID)


def test_lines_ends_are_the_zero_shot_model_and_the_best_individual_bit_for_bit(prepared_demo):
    from conftest import perturbed
    from pipeline.prepared import load_zero_shot
    from pipeline.model.components import components
    from pipeline.soup.mixing import fuse

    reference, _ = load_zero_shot(prepared_demo)
    theta0 = reference.state_dict()
    theta_src = perturbed(theta0, seed=1, scale=0.05)
    comps = components(reference, 2)
    names = [c.name for c in comps]
    assert names[0] == "stem" and names[-1] == "head" and len(names) > 3
    for (alpha, beta), end in (((1.0, 0.0), theta_src), ((0.0, 0.0), theta0)):
        fused = fuse([theta0, theta_src], beta_of(lambdas(names, alpha, beta)), comps)
        for name, t in end.items():
            assert torch.equal(fused[name], t), (alpha, beta, name)
    # in between, the stem keeps alpha of the update and the last block alpha + beta
    fused = fuse([theta0, theta_src], beta_of(lambdas(names, 0.0, 1.0)), comps)
    stem, head = comps[0].params[0], comps[-1].params[0]
    assert torch.equal(fused[stem], theta0[stem]) and torch.equal(fused[head], theta_src[head])


# ---- settings: soup.methods.<name>, aliases, errors, keys -------------------------------------

def test_method_settings_live_under_soup_methods_and_the_old_keys_still_work():
    cfg = load_config(None, ["soup.wise_ft.alphas=[0.5, 1.0]", "soup.output_ensemble.enabled=false",
                             "soup.methods.model_stock.members=all"])
    assert cfg.soup.methods["wise_ft"].alphas == [0.5, 1.0]
    assert not cfg.soup.methods["output_ensemble"].enabled
    assert cfg.soup.methods["model_stock"].members == "all"
    assert cfg.soup.methods["lines"].grid == DEFAULT_GRID and cfg.soup.publish == "mmms"
    dumped = cfg.model_dump(mode="json")["soup"]
    assert "wise_ft" not in dumped and dumped["methods"]["wise_ft"]["alphas"] == [0.5, 1.0]


@pytest.mark.parametrize("override, message", [
    ("soup.methods.nosuch.enabled=true", "soup.methods.nosuch: Extra inputs are not permitted"),
    ("soup.methods.lines.grid=[[0.5, 0.75]]", "soup.methods.lines.grid: Value error, every lambda must lie in [0, 1]"),
    ("soup.methods.model_stock.members=1", "soup.methods.model_stock.members: Value error, must be 'all' or at least 2"),
    ("soup.methods.model_stock.colour=red", "soup.methods.model_stock.colour: Extra inputs are not permitted"),
    ("soup.publish=output_ensemble", "soup.publish: Value error, 'output_ensemble' is not one model"),
    ("soup.publish=zero_shot", "soup.publish: Value error, 'zero_shot' is no soup method"),
    ("soup.methods.mmms_phase1.enabled=false", "soup.methods: Value error, mmms needs mmms_phase1, which is disabled"),
])
def test_a_wrong_method_setting_fails_at_load_in_one_line_naming_it(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_disabled_method_cannot_be_published():
    with pytest.raises(ConfigError, match=r"soup.publish: Value error, 'lines' is disabled"):
        load_config(None, ["soup.publish=lines", "soup.methods.lines.enabled=false"])
    assert load_config(None, ["soup.publish=model_stock"]).soup.publish == "model_stock"


def test_the_soup_key_holds_each_enabled_method_with_its_version_and_settings(monkeypatch):
    from pipeline.soup.methods import SOUP_METHODS

    base = load_config(None, ["soup.methods.lines.enabled=false"])
    keys = method_keys(base.soup)
    assert "lines" not in keys and keys["model_stock"] == {
        "version": 1, "settings": {"enabled": True, "members": 2, "start": None}}
    # a disabled method's settings are in no key; switching it on or changing it is
    assert method_keys(load_config(None, ["soup.methods.lines.enabled=false",
                                          "soup.methods.lines.grid=[[1, 0]]"]).soup) == keys
    on = method_keys(load_config(None, []).soup)
    assert on["lines"]["settings"]["grid"] == [list(p) for p in DEFAULT_GRID]
    assert {k: v for k, v in on.items() if k != "lines"} == keys
    # a new version of a method's code changes its part of the key
    monkeypatch.setattr(type(SOUP_METHODS["model_stock"]), "version", 2)
    assert method_keys(base.soup)["model_stock"]["version"] == 2


def test_config_stands_below_the_soup_package():
    import subprocess
    import sys

    code = ("import sys, pipeline.config; "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.soup')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
