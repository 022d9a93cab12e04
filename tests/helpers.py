"""Statistical helpers shared by the tests: z-scores from measured standard errors."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from fqtorch.backends.int8_qconv import qconv_verdict
from fqtorch.quantizers import get_quantizer, list_quantizers


@contextmanager
def warnings_as_errors() -> Iterator[None]:
    """Every warning raised inside is an error (a fallback to simulate, a refusal), except two
    that depend on where the test runs, not on fqtorch:

    - PyTorch's own deprecation notices, which come from whichever torch module a test happens
      to import first in its process (the first ``torch.compile`` imports ``torch.utils.mkldnn``,
      which warns about ``torch.jit``), so they depend on the order the tests run in;
    - on a CPU whose oneDNN int8 convolution saturates (AVX2 without VNNI: ``qconv_verdict()``
      says why), a Conv2d's warning that it runs on im2col + ``torch._int_mm`` instead. That is
      still the integer path (the probe's own tests check the warning).

    fqtorch's own warnings are RuntimeWarnings (attributed to the caller's line), which the first
    exception never covers."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"torch(\.|$)")
        if qconv_verdict() is not None:
            warnings.filterwarnings(
                "ignore", message=r".*running its Conv2d on im2col", category=RuntimeWarning
            )
        yield


# Indicator directions are added per row and per column of a target's 2-D view only up to this
# many of each (beyond it they would dominate the cost of the test and its Bonferroni count).
MAX_INDICATORS = 512


def z_limit(count: int, alpha: float = 1e-3) -> float:
    """Two-sided Bonferroni threshold: P(any of ``count`` N(0,1) scores exceeds it) ≤ ``alpha``.
    A mean over its own sample standard error is Student-t, not N(0, 1): pass it through
    :func:`t_as_z` first."""
    return float(torch.special.ndtri(torch.tensor(1 - alpha / (2 * count), dtype=torch.float64)))


def t_limit(count: int, samples: int, alpha: float = 1e-3) -> float:
    """:func:`z_limit` for Student-t scores over ``samples`` draws (``samples − 1`` degrees of
    freedom): the multiple of a measured standard error a window may span."""
    from scipy.stats import t as student_t

    return float(student_t.isf(alpha / (2 * count), samples - 1))


def t_as_z(t: Tensor, samples: int) -> Tensor:
    """Student-t scores (a mean over the standard error measured from the same ``samples``
    draws: ``samples − 1`` degrees of freedom) as the N(0, 1) scores of the same tail
    probability, so that :func:`z_limit` holds for them (its normal threshold on t-scores from
    200 draws false-alarms 1.6–2.7× as often as it says). ±inf stay ±inf."""
    import numpy as np
    from scipy.stats import norm
    from scipy.stats import t as student_t

    values = t.detach().double().cpu().numpy()
    z = np.asarray(np.sign(values) * norm.isf(student_t.sf(np.abs(values), samples - 1)))
    return torch.from_numpy(z).reshape(t.shape).to(t.dtype)


def binomial_upper(n: int, p: float, tail: float = 1e-3) -> int:
    """The smallest k with P(Bin(n, p) > k) ≤ tail: the most false alarms ``n`` trials of a test
    at level ``p`` give, but for a chance of ``tail``."""
    cdf = 0.0
    for k in range(n + 1):
        log_pmf = (
            math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p)
        )  # fmt: skip
        cdf += math.exp(log_pmf)
        if 1 - cdf <= tail:
            return k
    return n


def library_quantizers() -> list[str]:
    """The quantizers fqtorch registers itself, sorted. Test modules register deliberately biased
    ones at import; whether those are registered yet depends on the order pytest collects in,
    so the properties every quantizer must have are checked on these."""
    return [
        name
        for name in list_quantizers()
        if type(get_quantizer(name)).__module__.startswith("fqtorch.")
    ]


def _indicators(labels: Tensor, count: int) -> Tensor:
    """(entries, count) float64: column ``k`` is 1 on the entries whose label is ``k``."""
    return torch.nn.functional.one_hot(labels, count).double()


def projection_directions(
    target: Tensor, gaussian: int = 64, seed: int = 0, structured: bool = True
) -> Tensor:
    """(entries, K) float64 directions on which :func:`projection_z` compares means.

    ``gaussian`` random N(0, 1) directions see a bias of any shape, but a shift of every entry
    the same way only at the scale of one entry's noise: it projects on them as a sum with random
    signs. The structured directions see it with full power: all ones (every entry shifted the
    same way), ``sign(target)`` (shrunk towards zero or pushed away from it) and, for a target of
    2 or more dims, one indicator per row and one per column of its ``(rows, -1)`` view (a shift
    confined to one sample or one feature: a group's grid).
    """
    flat = target.reshape(-1).double()
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(flat.numel(), gaussian, generator=gen, dtype=torch.float64)]
    if structured:
        parts += [torch.ones_like(flat)[:, None], flat.sign()[:, None]]
        if target.dim() >= 2:
            rows = target.shape[0]
            cols = flat.numel() // rows
            index = torch.arange(flat.numel())
            if rows <= MAX_INDICATORS:
                parts.append(_indicators(index // cols, rows))
            if cols <= MAX_INDICATORS:
                parts.append(_indicators(index % cols, cols))
    return torch.cat(parts, dim=1)


def projection_z(
    samples: Tensor,
    target: Tensor,
    directions: int = 64,
    seed: int = 0,
    structured: bool = True,
) -> Tensor:
    """z-scores of the sample mean against ``target`` along :func:`projection_directions`
    (``directions`` Gaussian ones, and the structured ones unless ``structured=False``).

    ``samples`` is (M, ...). Projections are sums over many entries, so their standard error is
    never 0 for a stochastic quantizer and their mean is close to normal; a bias of any shape
    shows on the random directions, a systematic one on the structured directions with full
    power. Float rounding is not a bias: a miss within a few units of the samples' float
    precision of the projection's magnitude (``Σ |u_i||s_i|``) counts as none, and a projection
    whose spread is at that level (only grid end points feed it) counts as exact only if it hits.
    Judge the largest ``|z|`` against ``z_limit(z.numel())``: Bonferroni over every direction.
    """
    m = samples.shape[0]
    flat = samples.reshape(m, -1).double()
    basis = projection_directions(target, directions, seed, structured)
    proj = flat @ basis  # (M, K)
    diff = proj.mean(0) - target.reshape(-1).double() @ basis
    spread = proj.std(0)
    rounding = 8 * torch.finfo(samples.dtype).eps * (flat.abs().mean(0) @ basis.abs())
    miss = (diff.abs() - rounding).clamp(min=0) * diff.sign()
    z = t_as_z(miss / (spread / math.sqrt(m)).clamp(min=1e-300), m)
    return torch.where(spread <= rounding, torch.where(miss == 0, 0.0, math.inf), z)


def heavy_rows(n: int, d: int, seed: int = 0, spread: float = 2.0) -> Tensor:
    """Gradient-like rows: N(0, 1) entries scaled per row by exp(N(0, spread²))
    (docs/method.md §4)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * torch.exp(spread * torch.randn(n, 1, generator=gen))


def exact_gradients(model: torch.nn.Module, loss_fn, batches) -> Tensor:
    """Each batch's exact (QAT) gradient of every parameter, flattened in float64: one row each,
    computed the plain way to check the estimators against."""
    from fqtorch.stats import exact_backward

    rows = []
    for x, y in batches:
        model.zero_grad()
        with exact_backward(model):
            loss_fn(model(x), y).backward()
        rows.append(torch.cat([p.grad.reshape(-1).double() for p in model.parameters()]))
    return torch.stack(rows)
