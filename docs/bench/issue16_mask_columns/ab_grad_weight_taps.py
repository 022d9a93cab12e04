"""A/B of ``int8_qconv._grad_weight_taps`` between two commits, interleaved in one process.

    git worktree add --detach /tmp/old 94c0f74
    OMP_NUM_THREADS=1 PYTHONPATH=src python docs/bench/issue16_mask_columns/ab_grad_weight_taps.py \
        /tmp/old 32x16x16x32 128x16x16x32 ...

The old module is loaded from the other checkout beside the current one (the modules it imports
are this checkout's; between 94c0f74 and 9c94396 only ``int8_qconv`` changed). Each layer
``NxCxOxS`` (batch N, C → O channels, 3 × 3, stride 1, padding 1, S × S, channels-last codes,
compiled epilogue) is checked for equal values, then timed old and new in turn: the medians and
the median [quartiles] of the per-pair ratios old / new (> 1: the new one is faster).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import torch

import fqtorch.backends.int8_qconv as new
from fqtorch.backends.base import ConvOps
from fqtorch.quantizers.base import QuantizedTensor


def load_old(checkout: str):
    path = f"{checkout}/src/fqtorch/backends/int8_qconv.py"
    spec = importlib.util.spec_from_file_location("fqtorch.backends._int8_qconv_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer(n: int, c: int, o: int, side: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (n, c, side, side), generator=g, dtype=torch.int8)
    h = torch.randint(-16, 16, (n * side * side, o), generator=g, dtype=torch.int8)
    hq = QuantizedTensor(h, torch.rand(1, o) + 0.1, torch.rand(1, o), 5, h.shape, torch.float32)
    ops = ConvOps((1, 1), (1, 1), (1, 1), 1)
    x = x.contiguous(memory_format=torch.channels_last)
    return hq, x, torch.tensor(0.02), torch.tensor(2.3), 8, (o, c, 3, 3), ops, torch.float32, True


def seconds(fn, args: tuple) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    old = load_old(sys.argv[1])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for spec in sys.argv[2:]:
        n, c, o, side = map(int, spec.split("x"))
        args = layer(n, c, o, side)
        a, b = old._grad_weight_taps(*args)[0], new._grad_weight_taps(*args)[0]
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
        reps = 40 if n * side * side * c < 3e6 else 10
        for _ in range(3):
            old._grad_weight_taps(*args), new._grad_weight_taps(*args)
        pairs = [
            (seconds(old._grad_weight_taps, args), seconds(new._grad_weight_taps, args))
            for _ in range(reps)
        ]
        t_old = sorted(p[0] for p in pairs)[reps // 2] * 1e3
        t_new = sorted(p[1] for p in pairs)[reps // 2] * 1e3
        ratios = sorted(p[0] / p[1] for p in pairs)
        q1, q2, q3 = ratios[reps // 4], ratios[reps // 2], ratios[3 * reps // 4]
        print(
            f"{spec}: old {t_old:.2f} ms, new {t_new:.2f} ms; old/new {q2:.2f} [{q1:.2f}-{q3:.2f}]",
            flush=True,
        )


if __name__ == "__main__":
    main()
