"""The measurements docs/method.md quotes outside the tests, as one script.

    python experiments/method_checks.py epilogue   # §8: int8 forward vs simulate, one-signed
    python experiments/method_checks.py bf16       # §9: rounding Q(G) to bf16 before the GEMM
    python experiments/method_checks.py grid       # §4: float32 grid arithmetic and E[Q(x)]
    python experiments/method_checks.py bhq        # §5: BHQ's error over PSQ's, 4 bits
    python experiments/method_checks.py bhq-leader # §5: E[Q(x)] on the leader of a large group
    python experiments/method_checks.py            # all five

``epilogue``: the int8 backend's forward against the simulate backend's on the same codes, where
the operands are one-signed (sparse post-ReLU inputs, all-positive weights) so the zero-point
term nearly cancels the integer product (docs/method.md §8). Prints, per reduction length K, the
largest difference over seeds relative to the output's largest magnitude (the form the tests'
tolerance takes) and the largest per-entry relative difference.

``bf16``: why the backward GEMMs take float32 operands (docs/method.md §9). Rounding a quantized
gradient ``Q(G)`` to bf16 (to nearest) before the GEMM biases it: ``E[bf16(Q(G))] ≠ G``. Over
``--samples`` draws of 8-bit PSQ on a fixed ``G``, it prints the per-entry z-statistic of the mean
error (mean / its standard error; about N(0, 1) per entry when unbiased), as an RMS over entries,
for ``Q(G)`` as fqtorch uses it and for ``bf16(Q(G))``. The RMS z of a bias grows as
``sqrt(samples)``; the ratio of the bias to the noise's standard deviation does not, and is
printed too.

``grid``: how far float32 arithmetic moves ``E[Q(x)]`` from ``x`` for the per-row integer grids
(PSQ, eager; docs/method.md §4). Stochastic rounding is unbiased for the grid position ``v`` as
computed, but ``v = (x − low)/Δ`` and the decoded grid points ``code·Δ + bias`` are float32. The
expectation over the uniforms is exact here: the codes ``⌊v⌋`` and ``⌊v⌋ + 1`` (the library's
``affine_params`` and the encode's two float32 operations), the rounding-up probability
``P(u < frac v)`` for uniforms on multiples of ``2**-24``, and the float32 decode. Prints the
largest ``|E[Q(x)] − x|`` per case in units of ulp(the row's largest magnitude) and of grid
steps.

``bhq``: BHQ's mean squared error over PSQ's at 4 bits on the inputs, seeds and draws of
``tests/quantizers/test_bhq.py`` (similar rows, heavy rows, the untrained digits model's
``grad_output`` per layer), which asserts BHQ ≤ PSQ within Monte-Carlo error (and < 0.5× on heavy
rows) but not the ratios themselves.

Deterministic for given arguments (fixed generators); a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.quantizers import get_quantizer
from fqtorch.quantizers.uniform import affine_params, group_minmax

# One-signed operands: inputs whose codes sit at the low end of the grid, and all-positive
# weights in [low, 2) (a narrow range: the weight codes sit high). Name: (inputs, low).
CASES = {
    "post-ReLU, 98% zeros": (lambda gen, k: (torch.randn(64, k, generator=gen) - 2.0).relu(), 1.0),
    "one outlier per row": (
        lambda gen, k: torch.cat(
            [0.01 * torch.rand(64, k - 1, generator=gen), torch.full((64, 1), 100.0)], dim=1
        ),
        1.0,
    ),
    "outlier 300, w >= 1.5": (
        lambda gen, k: torch.cat(
            [0.2 * torch.rand(64, k - 1, generator=gen), torch.full((64, 1), 300.0)], dim=1
        ),
        1.5,
    ),
}


def forward_gap(case: str, k: int, seed: int, fused: bool) -> float:
    """max |int8 − simulate| / max |simulate| of one forward; ``fused``: the int8 backend's
    compiled path (its default), else its eager functions."""
    gen = torch.Generator().manual_seed(seed)
    inputs, low = CASES[case]
    x = inputs(gen, k)
    layer = nn.Linear(k, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(low + (2.0 - low) * torch.rand(32, k, generator=gen))
    outputs = []
    for backend in ("simulate", "int8"):
        config = FQTConfig.preset("qat", backend=backend, fused=fused)
        model = quantize_model(copy.deepcopy(layer), config)
        with torch.no_grad():
            outputs.append(model(x).double())
    sim, int8 = outputs
    return float((int8 - sim).abs().max() / sim.abs().max())


def epilogue(lengths: list[int], seeds: int) -> None:
    print(f"max |int8 - simulate| / max |simulate|, the largest over {seeds} seeds")
    columns = [(name, fused) for fused in (True, False) for name in CASES]
    print(f"{'':<8}" + "".join(f"{'compiled' if f else 'eager':>24}" for _, f in columns))
    print(f"{'K':<8}" + "".join(f"{name:>24}" for name, _ in columns))
    for k in lengths:
        row = [max(forward_gap(n, k, seed, f) for seed in range(seeds)) for n, f in columns]
        print(f"{k:<8}" + "".join(f"{gap:>24.2e}" for gap in row))


def rms_z(errors: torch.Tensor) -> tuple[float, int]:
    """RMS over entries of mean / standard error (``errors`` stacked over samples, dim 0), and
    how many entries were left out: those with no noise (a row's largest magnitude lands on
    the grid's end exactly), whose float rounding alone would be an infinite z."""
    n = errors.shape[0]
    mean, std = errors.mean(0), errors.std(0)
    noisy = std > 0
    z = mean[noisy] / (std[noisy] / n**0.5)
    return float(z.pow(2).mean().sqrt()), int((~noisy).sum())


def bf16(samples: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(64, 256, generator=gen)
    quantizer = get_quantizer("psq", 8)
    exact = torch.empty(samples, *g.shape, dtype=torch.float64)
    rounded = torch.empty_like(exact)
    for i in range(samples):
        q = quantizer(g, gen)
        exact[i] = q.double() - g.double()
        rounded[i] = q.bfloat16().double() - g.double()
    print(f"8-bit PSQ on a {tuple(g.shape)} gradient, {samples} samples (seed {seed})")
    print(f"{'':<12}{'RMS z (unbiased: about 1)':>28}{'RMS bias / RMS noise std':>28}")
    for label, err in (("Q(G)", exact), ("bf16(Q(G))", rounded)):
        z, left_out = rms_z(err)
        ratio = float(err.mean(0).pow(2).mean().sqrt() / err.std(0).pow(2).mean().sqrt())
        note = f"   ({left_out} noiseless entries left out)" if left_out else ""
        print(f"{label:<12}{z:>28.2f}{ratio:>28.3f}{note}")


GRID_CASES = {  # name: rows of 2**16 entries from a generator
    "randn": lambda gen: torch.randn(4, 2**16, generator=gen),
    "randn^5 (heavy tails)": lambda gen: torch.randn(4, 2**16, generator=gen) ** 5,
    "1e-30 * randn": lambda gen: 1e-30 * torch.randn(4, 2**16, generator=gen),
    "1 + U[0, 1)": lambda gen: 1 + torch.rand(4, 2**16, generator=gen),
    "1000 + U[0, 1)": lambda gen: 1000 + torch.rand(4, 2**16, generator=gen),
}


def grid_mean_error(x: torch.Tensor, bits: int) -> tuple[float, float]:
    """max |E[Q(x)] − x| over entries, in ulp(the row's max |x|) and in grid steps (PSQ, eager
    float32 arithmetic, stochastic rounding on multiples of 2**-24)."""
    low, high = group_minmax(x, "row")
    offset, fold, divisor, step, bias = affine_params(low, high, bits)
    v = torch.addcmul(offset, x, fold).div_(divisor)  # the encode's grid position
    floor = torch.floor(v)
    up = torch.ceil((v - floor).double() * 2**24) / 2**24  # P(u < frac v)
    top = 2**bits - 1

    def decode(codes: torch.Tensor) -> torch.Tensor:
        return ((codes.clamp(0, top) - 2 ** (bits - 1)) * step + bias).double()

    mean = up * decode(floor + 1) + (1 - up) * decode(floor)
    error = (mean - x.double()).abs()
    largest = x.abs().amax(1, keepdim=True)
    ulp = (torch.nextafter(largest, torch.full_like(largest, math.inf)) - largest).double()
    return float((error / ulp).max()), float((error / step.double()).max())


def grid(seed: int) -> None:
    print("PSQ, eager float32: max |E[Q(x)] − x| over 4 rows of 2**16 entries")
    print(f"{'case':<24}{'bits':>5}{'ulp(max |row|)':>16}{'grid steps':>14}")
    for name, make in GRID_CASES.items():
        x = make(torch.Generator().manual_seed(seed))
        for bits in (2, 4, 8):
            ulps, steps = grid_mean_error(x, bits)
            print(f"{name:<24}{bits:>5}{ulps:>16.3g}{steps:>14.3g}")


def bhq_cases() -> types.ModuleType:
    """``tests/quantizers/bhq_cases.py``, the BHQ tests' inputs (no pytest needed), imported
    without leaving ``sys.path`` changed."""
    root = str(Path(__file__).resolve().parents[1])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        return importlib.import_module("tests.quantizers.bhq_cases")
    finally:
        if added:
            sys.path.remove(root)


def bhq() -> None:
    cases = bhq_cases()
    print(f"\n§5: BHQ / PSQ mean squared error, 4 bits, {cases.DRAWS} draws each")
    for case in cases.CASES:
        x = cases.case_input(case)
        errors = []
        for name, seed in (("bhq", 1), ("psq", 2)):
            q, g = get_quantizer(name, 4), cases.gen(seed)
            draws = [(q(x, g) - x).double().square().sum() for _ in range(cases.DRAWS)]
            errors.append(float(torch.stack(draws).mean()))
        print(f"{case:<24}{errors[0] / errors[1]:>8.3f}")


def bhq_leader(draws: int = 300) -> None:
    """The leader of a group of ~10⁴ rows (one row of ±5000 over 20,000 rows of range 1, 4
    columns: the BHQ test's input), 8-bit BHQ, eager and fused: per column the z-score of the
    mean error over ``draws`` draws (about N(0, 1) when unbiased), and the mean error over one
    draw's standard deviation."""
    x = bhq_cases().leader_over_rows(20000, 4)
    print(f"\n§5: BHQ's leader over a large group, 8 bits, {draws} draws: z, bias / sd")
    for fused in (False, True):
        q, g = get_quantizer("bhq", 8, fused=fused), torch.Generator().manual_seed(1)
        err = torch.stack([q(x, g)[0].double() - x[0].double() for _ in range(draws)])
        mean, sd = err.mean(0), err.std(0)
        z = mean / (sd / math.sqrt(draws))
        ratio = [round(float(v), 3) for v in mean / sd]
        name = "fused" if fused else "eager"
        print(f"{name:<8}z {[round(float(v), 2) for v in z]}  bias/sd {ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checks", nargs="*", help="epilogue, bf16, grid, bhq, bhq-leader (default: all)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 4096, 65536])
    parser.add_argument("--seeds", type=int, default=3, help="epilogue: seeds per length")
    parser.add_argument("--samples", type=int, default=1000, help="bf16: draws of Q(G)")
    parser.add_argument(
        "--seed", type=int, default=0, help="bf16: the gradient and the draws; grid: the rows"
    )
    args = parser.parse_args(argv)
    known = ["epilogue", "bf16", "grid", "bhq", "bhq-leader"]
    checks = args.checks or known
    unknown = sorted(set(checks) - set(known))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(known)}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if "epilogue" in checks:
        epilogue(args.lengths, args.seeds)
    if "bf16" in checks:
        bf16(args.samples, args.seed)
    if "grid" in checks:
        grid(args.seed)
    if "bhq" in checks:
        bhq()
    if "bhq-leader" in checks:
        bhq_leader()
    return 0


if __name__ == "__main__":
    sys.exit(main())
