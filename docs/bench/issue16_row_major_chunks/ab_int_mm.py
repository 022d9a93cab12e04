"""A/B of ``int8._int_mm`` between two commits on long weight-gradient reductions, interleaved
in one process.

    git worktree add --detach /tmp/old aecb8e3
    OMP_NUM_THREADS=1 PYTHONPATH=src python docs/bench/issue16_row_major_chunks/ab_int_mm.py \
        /tmp/old 401408x64x147 262144x256x256 200000x64x576

The old module is loaded from the other checkout beside the current one. Each shape ``LxOxK`` is
a weight gradient's product ``hᵀ x``: ``h`` (L, O) gradient codes read through its transpose,
``x`` (L, K) row-major input codes (im2col columns, or a Linear layer's L tokens), L past one
int32 product (``chunk_length(8, 8)`` = 131,064), so both sides chunk the reduction. Both
results are checked equal to each other, then timed old and new in turn: the medians and the
median [min–max] of the per-pair ratios old / new (> 1: the new one is faster).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import torch

import fqtorch.backends.int8 as new


def load_old(checkout: str):
    path = f"{checkout}/src/fqtorch/backends/int8.py"
    spec = importlib.util.spec_from_file_location("fqtorch.backends._int8_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    old = load_old(sys.argv[1])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for spec in sys.argv[2:]:
        rows, o, k = map(int, spec.split("x"))
        g = torch.Generator().manual_seed(0)
        h = torch.randint(-128, 128, (rows, o), generator=g, dtype=torch.int8)
        x = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
        args = (h.T, 8, x, 8)
        for a, b in zip(old._int_mm(*args), new._int_mm(*args), strict=True):
            assert torch.equal(a.to(torch.int64), b.to(torch.int64))
        pairs = [(seconds(old._int_mm, *args), seconds(new._int_mm, *args)) for _ in range(7)]
        t_old = sorted(p[0] for p in pairs)[3]
        t_new = sorted(p[1] for p in pairs)[3]
        ratios = sorted(p[0] / p[1] for p in pairs)
        print(
            f"{spec}: old {t_old * 1e3:.1f} ms, new {t_new * 1e3:.1f} ms, "
            f"old / new {ratios[3]:.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}]",
            flush=True,
        )


if __name__ == "__main__":
    main()
