"""The null distribution of the bias test: its threshold from the sample and batch counts alone.

Under the null hypothesis (the FQT gradient is an unbiased estimate of the QAT gradient) and
Gaussian noise on each projection of the gradient the test judges (docs/method.md §7: fixed
directions per parameter tensor; a projection sums many roundings; §7 says where that is not
enough for Gaussian noise), each
projection's z-score over ``S`` backward passes is Student-t with ``ν = S − 1`` degrees of freedom,
so ``z²`` is ``F(1, ν)``, whatever the projections' correlation. A layer's statistic is the mean
of ``z²`` over its projections and over ``B`` independent batches.

The projections of a layer are correlated in unknown ways (a few dominant samples' noise reaches
all of them), so the threshold assumes the worst: the mean of identically distributed variables is
smaller in the convex order than any one of them (Jensen), and independent sums keep the order,
so the statistic ``M`` is dominated by ``Y``, the mean of ``B`` independent ``F(1, ν)`` variables.
For any ``c < t``, ``P(M ≥ t) ≤ E(M − c)₊ / (t − c) ≤ E(Y − c)₊ / (t − c)``; at ``c`` the
``(1 − α)``-quantile of ``Y`` and ``t`` the *expected shortfall* of ``Y`` at level ``α``
(the mean of its upper ``α`` tail) the bound is ``α``. That expected shortfall is the threshold:
false alarms at most ``α`` whatever the correlation, and no input from the statistics under test.

For one batch the shortfall of ``F(1, ν)`` is computed exactly (numerical integration of the
Student-t density). For B > 1 it is estimated by Monte Carlo with a fixed seed (so the threshold
is a deterministic function of ``(S, B, α)``) and raised by two standard errors of that estimate
(the spread of the tail and the error of the estimated quantile where it starts); it never
exceeds the one-batch value, which bounds it (expected shortfall is subadditive). The margin is
asymptotic: at the ``k = 1000`` tail draws used for 7.5e-6 ≤ α ≤ 3.8e-3 (the bias test's levels:
its α of 1e-3 split over up to 134 layers, ResNet-50's 107 and PreAct-ResNet-56's 113 included)
the skewed tail makes it miss the true value 2.9% of the time at ν = 15 (not 2.3%), 3.6% at
ν = 7 and 5.3% at ν = 5 (``experiments/threshold_margin.py``, 6000 seeds each). Below 7.5e-6 the
draws stop at 2^27 (about 30 s at B = 4 on one core), so fewer are kept, ``k = α·2^27``, and the
margin misses more often (``--tail``: 3.8% at k = 336, 5.1% at 84 at ν = 15, 2000 seeds). For
ν ≤ 4 (S ≤ 5) ``t²`` has no finite variance, so no standard error: the one-batch value is used.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["DEFAULT_ALPHA", "check_test_parameters", "z2_threshold"]

DEFAULT_ALPHA = 1e-3  # the bias test's false-alarm level, all layers together

_TAIL_DRAWS = 1000
_MIN_DRAWS, _MAX_DRAWS = 2**18, 2**27
_CHUNK = 2**18
_FINITE_TAIL_VARIANCE = 4  # t²(ν) has a finite variance only for ν > 4
_SEED = 20201206  # the Monte Carlo's: the threshold is a function of (S, B, alpha) alone


def _one_batch_shortfall(nu: int, alpha: float) -> float:
    """``E[t² | t² ≥ q]`` for ``t`` Student-t(ν), ``q`` its upper ``alpha`` quantile of ``t²``."""
    from scipy import integrate, stats

    edge = stats.t.ppf(1 - alpha / 2, nu)
    tail, _ = integrate.quad(lambda x: x * x * stats.t.pdf(x, nu), edge, np.inf, limit=200)
    return 2 * tail / alpha


def check_test_parameters(samples: int, alpha: float) -> None:
    """Raise ``ValueError`` unless the bias test can run with these (before any work is done)."""
    if samples < 4:
        raise ValueError(
            f"samples must be >= 4 backward passes per batch for the bias test (the null mean of "
            f"z² is finite only for ν = S − 1 > 2), got {samples}"
        )
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


@functools.lru_cache(maxsize=256)
def z2_threshold(samples: int, batches: int, alpha: float) -> float:
    """The level-``alpha`` threshold on a layer's mean ``z²`` over ``batches`` batches of
    ``samples`` backward passes each (module docstring): ``P(mean z² ≥ threshold) ≤ alpha``
    under the null, for any correlation between the projections."""
    check_test_parameters(samples, alpha)
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    nu = samples - 1
    one_batch = _one_batch_shortfall(nu, alpha)
    if batches == 1 or nu <= _FINITE_TAIL_VARIANCE:
        # One batch: exact. ν ≤ 4: t² has no finite variance, so the Monte Carlo estimate has no
        # standard error to add; the one-batch value bounds the shortfall (subadditivity).
        return one_batch
    return min(_shortfall_estimate(nu, batches, alpha, _SEED), one_batch)


def _shortfall_estimate(
    nu: int, batches: int, alpha: float, seed: int, draws: int | None = None
) -> float:
    """Monte Carlo expected shortfall of ``Y`` (the mean of ``batches`` independent ``t²(ν)``)
    at level ``alpha``, raised by two standard errors of the estimator: the mean of the top
    ``k = α·n`` of ``n`` draws has variance ``(Var[Y | Y ≥ q] + (1 − α)(ES − q)²) / k`` for large
    ``n`` (the tail's own spread, and the error of the quantile ``q`` where the tail starts)."""
    if draws is None:
        draws = min(max(math.ceil(_TAIL_DRAWS / alpha), _MIN_DRAWS), _MAX_DRAWS)
    tail = max(2, math.ceil(alpha * draws))
    rng = np.random.Generator(np.random.PCG64(seed))
    top = np.empty(0)
    for start in range(0, draws, _CHUNK):
        size = min(_CHUNK, draws - start)
        y = np.square(rng.standard_t(nu, size=(size, batches))).mean(axis=1)
        top = np.concatenate([top, y])
        if top.size > tail:
            top = np.partition(top, top.size - tail)[-tail:]
    shortfall, quantile = top.mean(), top.min()
    variance = top.var(ddof=1) + (1 - alpha) * (shortfall - quantile) ** 2
    return float(shortfall + 2 * math.sqrt(variance / tail))
