"""The soup methods (a new method is one module), the report's paired test (exact
McNemar) on constructed cases with known answers. Ray-free."""
from __future__ import annotations

import importlib.util
import os
import sys
import textwrap

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.report import results as rep
from pipeline.soup.methods import SOUP_METHODS, MethodError, MethodResult, methods, run_methods, unregister

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from standin import ReferenceLike  # noqa: E402  (test scaffolding)

K, C = 6, 3
FUNCTION = ReferenceLike(K, C, seed=3, n_images=500)

TOP_TWO = '''
    """Average of the two best ingredients by val: the whole method."""
    import numpy as np

    from pipeline.soup.methods import MethodResult, SoupMethod, register


    @register
    class TopTwo(SoupMethod):
        name = "top2_average"
        summary = "the two best ingredients by val, 1/2 each"

        def budget(self, soup, n_ingredients, n_components):
            return 1

        def run(self, ctx):
            best = np.argsort(-np.asarray(ctx.val_accs), kind="stable")[:2]
            beta = np.zeros((ctx.K, ctx.n_components))
            beta[best] = 0.5
            (acc,) = ctx.evaluate([beta])
            return MethodResult(beta, acc, f"top-2 average val {acc:.4f}")
'''


def small_config():
    return load_config(None, ["soup.max_func_evals_per_dim=2", "soup.num_workers=2", "soup.phase2.evals_per_dim=2"])


def val_accs():
    return [FUNCTION(np.eye(K)[j][:, None].repeat(C, axis=1)) for j in range(K)]


@pytest.fixture
def top_two(tmp_path):
    path = tmp_path / "top_two.py"
    path.write_text(textwrap.dedent(TOP_TWO))
    spec = importlib.util.spec_from_file_location("top_two", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    unregister("top2_average")


def test_a_new_method_is_one_module_registered_with_the_registry(top_two):
    from pipeline.dryrun import evaluation_budget
    from pipeline.report.plots import method_style

    assert [m.name for m in methods()][-1] == "top2_average"
    lines: list[str] = []
    result = run_methods(small_config(), lambda betas: [FUNCTION(b) for b in betas], val_accs(), C, log=lines.append)
    top = result["top2_average"]
    best = sorted(range(K), key=lambda j: -val_accs()[j])[:2]
    assert np.flatnonzero(top.beta.any(axis=1)).tolist() == sorted(best)
    assert top.search_val == FUNCTION(top.beta) and top.cost["evaluations"] <= 1
    assert any(line.startswith("soup: top-2 average val") for line in lines)
    # the dry run, the report and the plots list it without being told
    assert evaluation_budget(small_config(), K, C)["top2_average"] == 1
    assert method_style("top2_average") == ("o", "tab:purple")
    report = {"methods": {"top2_average": {}}}
    assert ("top2_average", "the two best ingredients by val, 1/2 each") in rep.method_summaries(report)
    # the methods that need the stage's model services are skipped without them; the rest ran
    assert list(result.results) == [m.name for m in methods() if not m.needs_models]


def test_the_registry_refuses_a_second_method_of_a_name_and_a_result_that_is_no_model(top_two):
    from pipeline.soup.methods import SoupMethod, register

    class Impostor(SoupMethod):
        name = "top2_average"

    with pytest.raises(MethodError, match="registered twice"):
        register(Impostor)
    assert type(SOUP_METHODS["top2_average"]).__name__ == "TopTwo"
    with pytest.raises(MethodError, match="one model"):
        MethodResult()
    with pytest.raises(MethodError, match="one model"):
        MethodResult(beta=np.ones((1, 1)), ensemble=[0])


def test_a_method_needing_an_unregistered_one_is_refused():
    from pipeline.soup.methods import SoupMethod, register

    class Later(SoupMethod):
        name = "later"
        needs = ("not_a_method",)

    with pytest.raises(MethodError, match="not_a_method"):
        register(Later)
    assert "later" not in SOUP_METHODS


# ---- the exact McNemar test -------------------------------------------------------------------

@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),
    (0, 5, 2 / 2 ** 5),                      # all five discordant pairs one way: 2 * (1/2)^5
    (10, 2, 2 * (1 + 12 + 66) / 2 ** 12),     # 2 * P(X <= 2), X ~ Bin(12, 1/2) = 0.0386
    (3, 3, 1.0),
    (1, 0, 1.0),
])
def test_mcnemar_exact_matches_the_binomial_sums(b, c, p):
    assert rep.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert rep.mcnemar_exact(c, b) == rep.mcnemar_exact(b, c)


def test_mcnemar_holds_for_large_samples():
    assert rep.mcnemar_exact(20000, 20000) == 1.0
    assert rep.mcnemar_exact(10000, 11000) < 1e-9  # 1000 net wins of 21000 discordant images


def test_paired_tests_count_discordant_images_and_mark_what_is_not_significant():
    import base64

    n = 40
    mmms = np.ones(n, dtype=bool)
    close = mmms.copy()
    close[:2] = False                       # mmms alone right on 2 images: p = 0.5
    far = mmms.copy()
    far[:12] = False                         # on 12: p = 2^-11
    far[12] = True
    bits = {name: base64.b64encode(np.packbits(v).tobytes()).decode() for name, v in
            {"mmms": mmms, "close": close, "far": far}.items()}
    scores = {name: {"test": {"correct_bits": b, "n": n}} for name, b in bits.items()}
    out = rep.mcnemar_tests(scores, "mmms", ["mmms", "close", "far"], ["test"])
    assert out["tests"]["close"]["test"] == {"reference_only": 2, "other_only": 0, "p": 0.5}
    assert out["tests"]["far"]["test"]["reference_only"] == 12
    assert out["tests"]["far"]["test"]["p"] == pytest.approx(2 / 2 ** 12)
    report = {"mcnemar": out}
    assert rep.not_significant(report, "close", "test") and not rep.not_significant(report, "far", "test")
    assert not rep.not_significant(report, "mmms", "test")
