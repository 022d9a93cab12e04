"""A compiled uniform encode as one graph against the library's two graphs, one process.

    python benchmarks/uniform_encode.py [--shapes 8192x4096,8x802816,100352x64,2048x512]
                                        [--repeats 7] [--steps resnet18,char_gpt]

The fused uniform quantizers (PTQ, PSQ, per column, symmetric) compile their encode as two graphs:
the groups' grid parameters, materialized, then the rounding (``quantizers/uniform.py``,
``_TwoGraphs``). In one graph Inductor recomputes a group's parameters for every element. This
times both, and the eager encode, at 5 bits with stochastic rounding (hash noise), on a
``(rows, cols)`` tensor: the Linear step's ``grad_output`` (8192 × 4096), ResNet-18's stem output
at batch 8 as per-sample rows (8 × 64·112·112) and as per-channel columns (8·112·112 × 64), and
char_gpt's MLP ``grad_output`` (2048 × 512). The codes are the same either way
(tests/quantizers/test_fused.py). Median [min–max] ms and ns per element.

``--steps MODELS`` also times whole int8 PSQ5 training steps of ``benchmarks/train_step.py``'s
models (batch 8) with the encodes always as one graph and as the library runs them (two graphs
from a size that depends on the granularity), alternating five times, 3 steps each, one process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import fqtorch
from common import environment, matrix_shapes, median_seconds, ms_cell, print_header
from fqtorch.quantizers import uniform
from fqtorch.quantizers.fused import LazyCompiled

QUANTIZERS = ("ptq", "psq", "per_column", "symmetric", "symmetric_per_row")
SPLIT_FROM = dict(uniform.fused_affine.split_from)  # the library's rule


def set_split(split: bool) -> None:
    """Encodes as the library runs them (``split``), or always as one graph."""
    for kernel in (uniform.fused_affine, uniform.fused_symmetric):
        kernel.split_from = dict(SPLIT_FROM) if split else dict.fromkeys(SPLIT_FROM, 2**62)


def step_ab(name: str) -> None:
    """Whole int8 PSQ5 training steps, encodes as one compiled graph against two, alternating."""
    from train_step import make  # a sibling script

    base, x, y = make(name, 8, "cpu")
    cfg = fqtorch.FQTConfig.preset("psq5", backend="int8")
    model = fqtorch.quantize_model(copy.deepcopy(base), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[bool, list[float]] = {False: [], True: []}
    for split in (False, True):  # compile both
        set_split(split)
        step(), step()
    for _ in range(5):
        for split in (False, True):
            set_split(split)
            start = time.perf_counter()
            for _ in range(3):
                step()
            times[split].append((time.perf_counter() - start) / 3)
    set_split(True)
    for split, ts in times.items():
        label = "the library's split" if split else "always one graph"
        print(
            f"{name}, int8 PSQ5 step, {label}: {statistics.median(ts) * 1e3:.1f} ms "
            f"[{min(ts) * 1e3:.1f}–{max(ts) * 1e3:.1f}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", default="8192x4096,8x802816,100352x64,2048x512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", default="", help="models for the whole-step A/B, e.g. resnet18")
    args = parser.parse_args()
    shapes = matrix_shapes(args.shapes)
    print_header(environment())
    one_graph = {
        False: LazyCompiled(uniform._affine_kernel),
        True: LazyCompiled(uniform._symmetric_kernel),
    }

    def two_graphs(kernel, x, keys, bits, granularity, rounding):  # whatever the size
        params = kernel.stats(x, bits, granularity)
        return kernel.rounding(x, params, bits, rounding, keys), params[-2], params[-1]

    print("\nencode, ms [min–max] (ns per element): quantizer | one graph | two graphs | eager")
    for rows, cols in shapes:
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
        print(f"{rows}x{cols}")
        for name in QUANTIZERS:
            q = fqtorch.get_quantizer(name, 5, fused=True)
            keys = q.noise(torch.Generator().manual_seed(1), x.device)
            args_ = (x, keys, q.bits, q.granularity, q.rounding)
            library = uniform.fused_symmetric if q.symmetric else uniform.fused_affine
            one = one_graph[q.symmetric]

            def two(*a, kernel=library):
                return two_graphs(kernel, *a)

            if not all(map(torch.equal, one(*args_), two(*args_))):
                raise SystemExit(f"{name}: one graph and two graphs gave different codes")
            cells = [name]
            for kernel in (one, two, library.fn):
                seconds = median_seconds(lambda k=kernel, a=args_: k(*a), args.repeats)
                per = seconds["median"] * 1e9 / x.numel()
                cells.append(f"{ms_cell(seconds)} ({per:.2f})")
            print(" | ".join(cells))
    for name in filter(None, args.steps.split(",")):
        step_ab(name)


if __name__ == "__main__":
    main()
