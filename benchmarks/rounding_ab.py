"""What exact stochastic rounding costs eager code: ``floor(v) + [u < frac(v)]`` (fqtorch's,
docs/method.md §4) against the ``floor(v + u)`` it replaced (biased: the sum rounds to nearest
first), alternated in one process.

    python benchmarks/rounding_ab.py [--size 2048] [--repeats 12] [--json out.json]

Rows: the rounding alone on a ``size × size`` float32 tensor (with the two input copies it
overwrites, the same for both), and 8-bit eager PSQ and PTQ
quantize-and-dequantize of it with each formula in ``fqtorch.quantizers.rounding`` (the old one
patched in for its turns, then put back). Median [min–max] of ``--repeats`` rounds after 2 warm-up
rounds, the two formulas interleaved so that the machine's drift falls on both.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import fqtorch
from common import environment, interleaved, print_header, write_json
from fqtorch.quantizers import rounding


def old_round_(v: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The formula before commit ``ace6305``: two in-place passes, biased up by ``ulp(v)/2``."""
    return v.add_(uniform).floor_()


def with_formula(formula: Callable, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``formula`` as the library's stochastic rounding."""

    def run() -> object:
        kept = rounding.stochastic_round_
        rounding.stochastic_round_ = formula
        try:
            return fn()
        finally:
            rounding.stochastic_round_ = kept

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.size < 1 or args.repeats < 1:
        raise SystemExit("--size and --repeats: expected integers >= 1")
    env = environment()
    print_header(env)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(args.size, args.size, generator=gen)
    v = grad * 100

    u = torch.rand(v.shape, generator=gen)

    def alone(formula: Callable) -> Callable[[], object]:  # both overwrite their inputs: copies
        return lambda: formula(v.clone(), u.clone())

    rows: dict[str, dict[str, dict[str, float]]] = {}
    rows["rounding alone"] = interleaved(
        {"old": alone(old_round_), "new": alone(rounding.stochastic_round_)}, args.repeats
    )
    for name in ("psq", "ptq"):
        q = fqtorch.get_quantizer(name, 8, fused=False)
        same = [torch.Generator().manual_seed(1) for _ in range(2)]
        old = with_formula(old_round_, lambda q=q, g=same[0]: q(grad, g))()
        if torch.equal(old, q(grad, same[1])):
            raise SystemExit("the old formula was not used: fqtorch's rounding moved; update this")
        encode = lambda q=q: q(grad, gen)  # noqa: E731
        rows[f"8-bit eager {name.upper()}"] = interleaved(
            {"old": with_formula(old_round_, encode), "new": encode}, args.repeats
        )
    print(f"{'what':<22}{'old ms [min-max]':>26}{'new ms [min-max]':>26}{'new/old':>9}")
    for what, t in rows.items():
        cells = [
            f"{t[k]['median'] * 1e3:.1f} [{t[k]['min'] * 1e3:.1f}-{t[k]['max'] * 1e3:.1f}]"
            for k in ("old", "new")
        ]
        ratio = t["new"]["median"] / t["old"]["median"]
        print(f"{what:<22}{cells[0]:>26}{cells[1]:>26}{ratio:>9.2f}")
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
