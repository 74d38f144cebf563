"""The report's statistics come from scipy (binomtest): the Wilson interval and the exact McNemar
p-value agree with the formulas the report used before, frozen here, on a grid of cases."""
import math

import pytest

from pipeline.report import results as rep

Z_95 = 1.959963984540054


def frozen_wilson(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The hand-written Wilson interval the report used before scipy's (frozen copy)."""
    p = float(accuracy)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def frozen_mcnemar(b: int, c: int) -> float:
    """The exact McNemar p-value the report computed before (frozen copy)."""
    from scipy.stats import binom

    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


SIZES = [1, 2, 3, 5, 10, 37, 100, 321, 1000, 10000, 26000, 50000]


@pytest.mark.parametrize("n", SIZES)
def test_wilson_interval_matches_the_frozen_formula(n):
    for k in sorted({0, 1, 2, n // 3, n // 2, (9 * n) // 10, n - 2, n - 1, n} & set(range(n + 1))):
        got, want = rep.wilson_interval(k / n, n), frozen_wilson(k / n, n)
        assert got == pytest.approx(want, abs=1e-12, rel=0), (k, n)
        assert 0.0 <= got[0] <= k / n <= got[1] <= 1.0


COUNTS = [0, 1, 2, 3, 7, 10, 50, 99, 100, 101, 1000, 10000, 20000]


@pytest.mark.parametrize("b", COUNTS)
def test_mcnemar_matches_the_frozen_formula(b):
    for c in COUNTS:
        got, want = rep.mcnemar_exact(b, c), frozen_mcnemar(b, c)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300), (b, c)
        assert got == rep.mcnemar_exact(c, b)


def test_wilson_interval_refuses_no_images():
    with pytest.raises(ValueError, match="n must be > 0"):
        rep.wilson_interval(0.5, 0)
