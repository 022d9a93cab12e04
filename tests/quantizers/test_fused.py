"""Fused quantizers: the counter-based noise and the ``torch.compile``'d kernels.

The hash is checked value for value against a pure-Python reference (so integer wrap-around
behaves as assumed), then statistically; the compiled kernels against their eager code, for
unbiasedness and for their variance bound; the compile fallback by forcing a failure.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fqtorch.quantizers import formats, get_quantizer, householder, uniform
from fqtorch.quantizers import fused as fused_module
from fqtorch.quantizers.rounding import draw_keys, hash_uniform, index_halves
from tests.helpers import heavy_rows, library_quantizers, projection_z, warnings_as_errors, z_limit

CODED = [name for name in library_quantizers() if name != "identity"]
STOCHASTIC = ["ptq", "psq", "per_column", "bhq", "rht", "symmetric"]


def reference_uniform(k0: int, k1: int, count: int) -> list[int]:
    """hash_uniform's 24-bit integers in plain Python: ``& 0xFFFFFFFF`` after every step."""
    mask = 0xFFFFFFFF

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x846CA68B) & mask
        return x ^ (x >> 16)

    return [mix(mix(i ^ (k0 & mask)) ^ (k1 & mask)) >> 8 for i in range(count)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestHashUniform:
    @pytest.mark.parametrize("keys", [(0, 0), (123456789, -987654321), (-(2**31), 2**31 - 1)])
    def test_matches_python_reference(self, keys):
        got = hash_uniform((20, 50), torch.tensor(keys, dtype=torch.int32), torch.float64)
        expected = torch.tensor(reference_uniform(*keys, 1000), dtype=torch.float64) * 2.0**-24
        assert torch.equal(got.reshape(-1), expected)

    def test_index_halves(self):
        index = torch.tensor([0, 5, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**33 + 7])
        low, high = index_halves(index)
        assert low.dtype == high.dtype == torch.int32
        rebuilt = (high.long() << 32) + (low.long() & 0xFFFFFFFF)
        assert torch.equal(rebuilt, index)
        assert torch.equal(low[:3].long(), index[:3]) and not high[:3].any()

    def test_on_grid_in_unit_interval_and_reproducible(self):
        keys = draw_keys(gen(1), torch.device("cpu"))
        u = hash_uniform((1000,), keys, torch.float32)
        assert u.min() >= 0 and u.max() < 1
        assert torch.equal(u * 2**24, (u * 2**24).round())
        assert torch.equal(u, hash_uniform((1000,), keys.clone(), torch.float32))

    def test_moments_and_histogram(self):
        n = 1 << 20
        u = hash_uniform((n,), draw_keys(gen(2), torch.device("cpu")), torch.float64)
        # Mean and variance of U[0,1): 1/2 and 1/12, within 5 standard errors.
        assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
        assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
        # Chi-square over 256 bins: normal approximation of a 255-dof statistic.
        counts = torch.histc(u, bins=256, min=0, max=1)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
        assert abs(chi2 - 255) / math.sqrt(2 * 255) < 5

    def test_neighbours_and_keys_uncorrelated(self):
        n = 1 << 18
        keys = torch.tensor([7, 11], dtype=torch.int32)
        u = hash_uniform((n,), keys, torch.float64) - 0.5
        flipped = hash_uniform((n,), keys ^ torch.tensor([1, 0], dtype=torch.int32), torch.float64)
        limit = 5 / math.sqrt(n)
        for a, b in [(u[1:], u[:-1]), (u, flipped - 0.5)]:
            corr = (a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean())
            assert abs(corr.item()) < limit

    def test_keys_come_from_the_generator(self):
        a = draw_keys(gen(3), torch.device("cpu"))
        b = draw_keys(gen(3), torch.device("cpu"))
        assert a.dtype == torch.int32 and torch.equal(a, b)
        g = gen(3)
        assert not torch.equal(draw_keys(g, torch.device("cpu")), draw_keys(g, torch.device("cpu")))


def eager(q):
    """The same quantizer running its kernels uncompiled (same noise keys)."""
    q.kernel = lambda kernel: kernel.fn
    return q


# The compiled kernel each quantizer's encode runs (BHQ on more than 2 rows).
ENCODE_KERNEL = {
    "ptq": uniform.fused_affine,
    "psq": uniform.fused_affine,
    "per_column": uniform.fused_affine,
    "rht": uniform.fused_affine,
    "symmetric": uniform.fused_symmetric,
    "symmetric_per_row": uniform.fused_symmetric,
    "bhq": householder.fused_round_transformed,
    **{name: formats.fused_format for name in library_quantizers() if formats.is_format(name)},
}


# (quantizer, split): the uniform encodes run as one compiled graph or two (by size), both tested.
SPLITS = [
    (name, split)
    for name in CODED
    for split in ((False, True) if isinstance(ENCODE_KERNEL[name], uniform._TwoGraphs) else (None,))
]


class _Counted:
    """A kernel part that notes its calls in ``log`` (attributes are the part's own)."""

    def __init__(self, part, name: str, log: list[str]) -> None:
        self.part, self.name, self.log = part, name, log

    def __call__(self, *args):
        self.log.append(self.name)
        return self.part(*args)

    def __getattr__(self, attr):
        return getattr(self.part, attr)


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot build a kernel on this machine, or ``None`` when it can."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as error:  # what LazyCompiled falls back on
        return f"torch.compile cannot build kernels here: {type(error).__name__}: {error}"
    return None


def assert_compiled(kernel: fused_module.Kernel, split: bool | None = None) -> None:
    """The last call of ``kernel`` ran its compiled graphs (a uniform encode: two when ``split``):
    it has them and never fell back to eager. Where compiling is disabled or impossible it skips,
    saying why; elsewhere a fallback fails."""
    if torch._dynamo.config.disable:
        pytest.skip(f"{kernel} ran eagerly: torch.compile is disabled (TORCH_COMPILE_DISABLE)")
    parts = (kernel,)
    if isinstance(kernel, uniform._TwoGraphs):  # a uniform encode: one graph, or two
        parts = (kernel.stats, kernel.rounding) if split else (kernel.whole,)
    for part in parts:
        if part._broken:
            reason = compile_unavailable()
            if reason is not None:
                pytest.skip(f"{part} ran eagerly: {reason}")
            pytest.fail(f"{part} fell back to eager although torch.compile works here")
        assert part._compiled is not None, f"{part} was never compiled"


@pytest.mark.slow
class TestFusedKernels:
    """Compiled and eager runs of a fused quantizer give the same codes, bit for bit."""

    @pytest.mark.parametrize("name,split", SPLITS)
    @pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
    def test_compiled_equals_eager(self, name, split, rounding, monkeypatch):
        x = heavy_rows(300, 70, seed=4)
        kernel = ENCODE_KERNEL[name]
        calls: list[str] = []
        if split is not None:  # a uniform encode: as one compiled graph, or as two
            threshold = 0 if split else 2**62  # (RHT encodes its padded transform, not x)
            monkeypatch.setattr(kernel, "split_from", dict.fromkeys(kernel.split_from, threshold))
            for part in ("whole", "stats", "rounding"):
                monkeypatch.setattr(kernel, part, _Counted(getattr(kernel, part), part, calls))
        compiled = get_quantizer(name, 4, rounding=rounding, fused=True).encode(x, gen(5))
        assert_compiled(kernel, split)  # else this would compare eager with eager
        if split is not None:  # and the path under test is the one that ran
            assert calls == (["stats", "rounding"] if split else ["whole"]), calls
        reference = eager(get_quantizer(name, 4, rounding=rounding, fused=True)).encode(x, gen(5))
        if formats.is_format(name):  # float8/e8m0/fp4 storage: compare the stored bytes
            for a, b in ((compiled.codes, reference.codes), (compiled.scale, reference.scale)):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert torch.equal(compiled.dequantize(), reference.dequantize())
            return
        torch.testing.assert_close(compiled.scale, reference.scale, rtol=1e-6, atol=0)
        # bias = low + half·step may be computed with an FMA when compiled: compare it on the
        # scale of a step.
        step = float(reference.scale.abs().max())
        torch.testing.assert_close(compiled.bias, reference.bias, rtol=1e-6, atol=1e-5 * step)
        assert torch.equal(compiled.codes, reference.codes)

    @pytest.mark.parametrize("name", ["psq", "bhq"])
    def test_shapes_change_and_values_decode(self, name):
        q = get_quantizer(name, 5, fused=True)
        for rows, cols in [(8, 3), (33, 17), (5, 64)]:
            x = heavy_rows(rows, cols, seed=rows)
            out = q(x, gen(1))
            assert out.shape == x.shape and torch.isfinite(out).all()
            assert torch.equal(out, q.encode(x, gen(1)).dequantize(fused=True))

    @pytest.mark.parametrize("name", STOCHASTIC)
    def test_reproducible_from_the_generator(self, name):
        q = get_quantizer(name, 3, fused=True)
        x = heavy_rows(12, 9, seed=6)
        assert torch.equal(q(x, gen(7)), q(x, gen(7)))
        assert not torch.equal(q(x, gen(7)), q(x, gen(8)))

    @pytest.mark.parametrize("name", STOCHASTIC)
    def test_unbiased(self, name):
        q = get_quantizer(name, 3, fused=True)
        x = heavy_rows(16, 24, seed=9)
        g = gen(10)
        samples = torch.stack([q(x, g) for _ in range(1500)])
        z = projection_z(samples, x)
        assert z.abs().max() < z_limit(z.numel()), z

    @pytest.mark.parametrize("name", ["ptq", "psq", "bhq"])
    def test_error_below_bound(self, name):
        q = get_quantizer(name, 4, fused=True)
        x = heavy_rows(64, 32, seed=11)
        g = gen(12)
        errors = torch.stack([(q(x, g) - x).square().sum() for _ in range(200)])
        mean, se = errors.mean(), errors.std() / math.sqrt(errors.numel())
        assert mean - 4 * se <= q.variance_bound(x)

    def test_repr_names_fused(self):
        assert repr(get_quantizer("psq", 4, fused=True)) == "psq(4, stochastic, fused)"
        with pytest.raises(TypeError, match="fused must be a bool"):
            get_quantizer("psq", 4, fused="yes")


class TestLazyCompiled:
    def test_falls_back_to_eager_once_with_a_warning(self, monkeypatch):
        def broken_compile(fn, **kwargs):
            def run(*args):
                raise RuntimeError("no C++ compiler\nsecond line")

            return run

        monkeypatch.setattr(fused_module.torch, "compile", broken_compile)
        kernel = fused_module.LazyCompiled(lambda x: x * 2)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert torch.equal(kernel(torch.ones(3)), torch.full((3,), 2.0))
        with warnings_as_errors():
            assert torch.equal(kernel(torch.ones(2)), torch.full((2,), 2.0))

    def test_a_genuine_error_is_raised_unchanged(self):
        def bad(x):
            raise ValueError("bad input shape")

        kernel = fused_module.LazyCompiled(bad)
        with pytest.raises(ValueError, match="bad input shape"):
            kernel(torch.ones(3))
        assert not kernel._broken


@pytest.mark.parametrize("per_function", [True, False], ids=["torch.compile", "per-call"])
def test_a_kernel_keeps_more_graphs_than_dynamos_default(monkeypatch, per_function):
    """One kernel serves every layer and role of a model, so it holds GRAPHS_PER_KERNEL graphs
    (and not one more), past dynamo's default limit of 8, whether torch.compile takes the limit
    (``recompile_limit=``) or it is set around each call (older torch). Dynamo's eager backend
    stands in for Inductor; a string argument makes a graph per value. The control, a plain
    torch.compile, stops at dynamo's default (so the count can fail)."""
    from torch._dynamo.utils import counters

    if torch._dynamo.config.disable:
        pytest.skip("torch.compile is disabled (TORCH_COMPILE_DISABLE=1)")
    if per_function and not fused_module._LIMIT_PER_FUNCTION:
        pytest.skip("this torch.compile takes no recompile_limit")
    compile_ = torch.compile
    monkeypatch.setattr(fused_module, "_LIMIT_PER_FUNCTION", per_function)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    default = getattr(torch._dynamo.config, fused_module._LIMIT_KEY)
    tags = ["a" * (i + 1) for i in range(fused_module.GRAPHS_PER_KERNEL + 1)]

    def graphs(kernel) -> int:
        before = counters["stats"]["unique_graphs"]
        for tag in tags:
            kernel(torch.ones(3), tag)
        return counters["stats"]["unique_graphs"] - before

    def fresh():  # a new code object (dynamo keeps its graphs by code object)
        return eval(compile("lambda x, tag: x * len(tag)", "<fresh>", "eval"))

    assert graphs(fused_module.LazyCompiled(fresh())) == fused_module.GRAPHS_PER_KERNEL
    assert graphs(torch.compile(fresh(), dynamic=True)) == default


def test_compiled_kernels_are_named_in_a_profiler_trace() -> None:
    """A compiled quantizer shows in ``torch.profiler`` under its function's name, not only as an
    anonymous compiled graph (so a profile says which kernel took the time)."""
    q = get_quantizer("psq", 5, fused=True)
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(0))  # two graphs' size
    q.encode(x, torch.Generator().manual_seed(1))  # compile outside the trace
    with torch.profiler.profile() as prof:
        q.encode(x, torch.Generator().manual_seed(1))
    names = {event.key for event in prof.key_averages()}
    assert {"fqtorch::_affine_stats", "fqtorch::_affine_rounding"} <= names, sorted(names)


def test_a_compiler_failure_falls_back_for_its_dtype_only(monkeypatch):
    """A kernel the compiler cannot build for float64 (Inductor's vectorised frexp) runs float64
    eagerly from then on, and float32 stays compiled (one float64 call turned compilation off
    for every dtype, for the rest of the process)."""
    from fqtorch.quantizers.fused import LazyCompiled

    calls = []

    def fake_compile(fn, **options):
        def run(x):
            if x.dtype == torch.float64:
                raise RuntimeError("C++ compile error: no match for operator-")
            calls.append(x.dtype)
            return fn(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    kernel = LazyCompiled(lambda x: x * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(
            kernel(torch.ones(2, dtype=torch.float64)), torch.full((2,), 2.0).double()
        )
        kernel(torch.ones(2, dtype=torch.float64))
        kernel(torch.ones(2))
    said = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(said) == 1 and "for cpu float64 tensors" in said[0], said
    assert calls == [torch.float32]  # float32 still ran compiled
    assert kernel._broken == {(torch.float64, "cpu")} and kernel.compiles(torch.ones(1))


def test_a_compiler_failure_runs_eagerly_after_one_warning(monkeypatch):
    """Where ``torch.compile`` cannot build a kernel, the kernel runs its eager function (the
    same codes), says so once, at the caller's line (not fqtorch's), naming the error's first
    line; a genuine error in the function itself raises unchanged."""

    def no_compiler(fn, **options):
        def run(*args):
            raise RuntimeError("no C++ compiler found\n(the compiler's long report)")

        return run

    monkeypatch.setattr(torch, "compile", no_compiler)
    kernel = uniform._TwoGraphs(
        uniform._affine_kernel, uniform._affine_stats, uniform._affine_rounding
    )  # its own instance: the module's kernels keep compiling in later tests
    x = heavy_rows(12, 40, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernel(x, torch.Generator().manual_seed(5), 4, "row", "stochastic")
        second = kernel(x, torch.Generator().manual_seed(5), 4, "row", "stochastic")
    eager = uniform._affine_kernel(x, torch.Generator().manual_seed(5), 4, "row", "stochastic")
    for got in (first, second):
        for a, b in zip(got, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    said = [w for w in caught if "torch.compile failed" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert said[0].filename == __file__  # through _TwoGraphs and LazyCompiled: this file
    assert "RuntimeError: no C++ compiler found)" in str(said[0].message)
    assert "long report" not in str(said[0].message) and kernel.whole._broken

    def faulty(t):
        raise ValueError("a bug in the kernel itself")

    with pytest.raises(ValueError, match="a bug in the kernel itself"):
        fused_module.LazyCompiled(faulty)(torch.ones(2))
