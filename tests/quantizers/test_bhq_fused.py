"""Fused BHQ (``fused=True``) on the CPU: ``y = T x`` computed on the fly inside the compiled
passes, its group sums in a fixed order (explicit additions, never a compiled scatter-add), the
same transform and grids as the eager plan, the same codes compiled and eager and for any thread
count, both quantizations of a ``grad_output`` in shared passes, and the in-place inverse. Where
``torch.compile`` is disabled, fused BHQ takes the eager plan (``y`` materialized once) instead of
running its on-the-fly passes eagerly."""

from __future__ import annotations

import ast
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

from fqtorch.quantizers import get_quantizer, householder, twoway
from tests.helpers import heavy_rows


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def similar_rows() -> torch.Tensor:
    """Rows of close ranges: groups of two or three rows, all at most ``_LANES``."""
    return torch.randn(96, 40, generator=gen(1)) * (1 + 0.2 * torch.rand(96, 1, generator=gen(2)))


def group_sizes(x: torch.Tensor) -> torch.Tensor:
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    paper = householder._paper_transform(x, householder._spans(low, high))
    return torch.diff(paper.offsets, append=paper.offsets.new_tensor([x.shape[0]]))


INPUTS = {"similar": similar_rows, "heavy": lambda: heavy_rows(300, 70, seed=4)}


def eager(q):
    q.kernel = lambda kernel: kernel.fn
    return q


def test_inputs_cover_small_and_large_groups():
    """The two inputs take both ways of summing a group: lanes only, and large groups too."""
    assert group_sizes(INPUTS["similar"]()).max() <= householder._LANES
    assert group_sizes(INPUTS["heavy"]()).max() > householder._LANES**2  # three summing passes


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_group_sums_match_embedding_bag(name):
    """Each row's group sum from its lanes (or its large group's sum) is the group sum of
    ``v∘s∘x`` over its group, to float32 rounding."""
    x = INPUTS[name]()
    low, high = torch.aminmax(x, dim=1, keepdim=True)
    paper = householder._paper_transform(x, householder._spans(low, high))
    index, weight, large_sums, large_group, large = householder._row_lanes(
        paper, x, lambda k: k.fn
    )[:5]
    own = householder._lane_sums(x, index, weight)
    got = torch.where(large[:, None], large_sums[large_group], own)
    expected = paper.group_sums(x, paper.v * paper.row_scale)[paper.group]
    scale = float((x.abs() * (paper.v * paper.row_scale).abs()[:, None]).max())
    torch.testing.assert_close(got, expected, rtol=0, atol=64 * torch.finfo().eps * scale)


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_plan_is_the_eager_plans(name):
    """The same groups kept, scales and coefficients, and the same grids to float32 rounding, as
    the plan that materializes ``y`` (the one ``variance_bound`` and ``fused=False`` use)."""
    x = INPUTS[name]()
    reference = householder._plan(x.clone())
    plan = householder._fused_plan(x, torch.aminmax(x, dim=1, keepdim=True), lambda k: k.fn)
    for field in ("group", "v", "coef", "row_scale"):
        assert torch.equal(getattr(plan.transform, field), getattr(reference.transform, field))
    assert plan.transform.fused and not reference.transform.fused
    step = (reference.high - reference.low).abs()
    for a, b in ((plan.low, reference.low), (plan.high, reference.high)):
        assert ((a - b).abs() <= 1e-5 * step).all()


@pytest.mark.slow
class TestCompiled:
    @pytest.mark.parametrize("name", sorted(INPUTS))
    def test_two_way_compiled_equals_eager_and_two_encodes(self, name):
        x = INPUTS[name]()
        if householder._falls_back(householder.fused_round_transformed_two_way, x):
            pytest.skip("torch.compile is disabled: encode_two_way encodes one after the other")
        qg, qh = get_quantizer("bhq", 5, fused=True), get_quantizer("per_column", 8, fused=True)
        compiled = twoway.encode_two_way(x, qg, qh, gen(3))
        assert householder.fused_round_transformed_two_way._compiled is not None
        reference = twoway.encode_two_way(x, qg, qh, gen(3), compiled=False)
        g = gen(3)
        separate = (eager(get_quantizer("bhq", 5, fused=True)).encode(x, g), qh.encode(x, g))
        for got in (compiled, separate):
            for a, b in zip(got, reference, strict=True):
                assert torch.equal(a.codes, b.codes)
                assert torch.equal(a.scale, b.scale) and torch.equal(a.bias, b.bias)
        assert compiled[0].transform is not None and compiled[1].transform is None

    def test_same_codes_with_one_and_two_threads(self):
        x = heavy_rows(2048, 256, seed=3)
        threads = torch.get_num_threads()
        encoded = {}
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                encoded[count] = get_quantizer("bhq", 4, fused=True).encode(x, gen(5))
        finally:
            torch.set_num_threads(threads)
        for field in ("codes", "scale", "bias"):
            assert torch.equal(getattr(encoded[1], field), getattr(encoded[2], field)), field

    @pytest.mark.parametrize("name", sorted(INPUTS))
    def test_inverse_in_place_is_the_inverse(self, name):
        x = INPUTS[name]()
        transform = get_quantizer("bhq", 5, fused=True).encode(x, gen(6)).transform
        y = torch.randn(x.shape[0], 24, generator=gen(7))
        expected = householder._plan(x.clone()).transform.inverse(y)  # the eager inverse
        got = y.clone()
        assert transform.inverse_(got) is got
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(transform.inverse(y), expected, rtol=1e-6, atol=1e-6)
        left_alone = transform.coef == 0
        assert left_alone.any() == (name == "similar")  # heavy rows: every group reflected
        assert torch.equal(got[left_alone], y[left_alone])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fused_and_eager_decode_a_non_finite_entry_alike(bad):
    """A NaN or Inf turns its BHQ group NaN (the documented policy) with ``fused=True`` (its
    eager functions) as with ``fused=False``; the group is plain (the variance comparison
    fails), so only the inverse spreads it: its rows where the transform is the identity too."""
    x = torch.randn(60, 20, generator=gen(1)) * torch.logspace(-2, 2, 60)[:, None]
    x[5, 3] = bad
    fused = eager(get_quantizer("bhq", 5, fused=True)).encode(x, gen(2))
    plain = get_quantizer("bhq", 5, fused=False).encode(x, gen(2))
    group = plain.transform.group == plain.transform.group[5]
    assert group.sum() > 1 and (plain.transform.coef[group] == 0).all()
    for encoded in (fused, plain):
        out = encoded.dequantize()
        assert torch.isnan(out[group]).all() and torch.isfinite(out[~group]).all()


def test_eager_inverse_in_place_is_the_inverse():
    """The eager ``inverse_`` (``fused=False``'s transform) gives :meth:`inverse`'s values bit for
    bit, a non-finite entry's spreading over its group included, and leaves the other rows of
    plain groups untouched."""
    x = similar_rows()
    transform = householder._plan(x.clone()).transform
    plain = transform.coef == 0
    assert plain.any() and not plain.all()
    for bad in (None, math.nan):
        y = torch.randn(x.shape[0], 30000, generator=gen(8))
        if bad is not None:
            y[int(plain.nonzero()[0]), 7] = bad
        expected, got = transform.inverse(y), y.clone()
        assert transform.inverse_(got) is got
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert x.shape[0] > householder._INVERSE_BLOCK // 30000  # several blocks


def test_modules_import_no_private_names():
    """BHQ's module and the two-way module share the uniform grid code through public names."""
    for module in (householder, twoway):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, (module.__name__, node.module, private)


def test_encode_two_way_checks_its_input():
    with pytest.raises(TypeError, match="bhq expects a floating-point tensor"):
        get_quantizer("bhq", 5, fused=True).encode_two_way(
            torch.ones(8, 4, dtype=torch.int32), get_quantizer("per_column", 8, fused=True)
        )


# Peak memory (growth of the process's peak RSS, in units of x's or y's bytes) of one call, in a
# fresh process with torch.compile disabled: the eager fallback fused BHQ takes there.
PEAK_SCRIPT = """
import resource, sys, torch
from fqtorch.quantizers import get_quantizer, householder
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
name, fused = sys.argv[1], sys.argv[2] == "fused"
x = torch.randn(2048, 4096, generator=g).mul_(torch.logspace(-3, 3, 2048)[:, None])
q = get_quantizer(name, 5, fused=fused)
if len(sys.argv) > 3:  # the inverse, in place, on a buffer of x's size
    t = q.encode(x[:, :64].contiguous(), g).transform
    x.normal_(generator=g)
    call = lambda: t.inverse_(x)
else:
    call = lambda: q.encode(x, g)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
call()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 / (x.numel() * 4))
"""


def peak_growth(*args: str) -> float:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *args], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return float(run.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS in KiB (Linux getrusage)")
@pytest.mark.slow
class TestEagerFallbackMemory:
    def test_encode_needs_no_more_than_fused_psq(self):
        """Without torch.compile, fused BHQ holds at most a little more than fused PSQ (the same
        hash-noise rounding, no transform): the eager plan's ``y``, rounded in place (measured
        0.2 N×D more). Its on-the-fly passes, run eagerly, held 1.5 N×D more."""
        extra = peak_growth("bhq", "fused") - peak_growth("psq", "fused")
        assert extra < 0.8, extra

    @pytest.mark.parametrize("quantizer", ["fused", "plain"])
    def test_inverse_in_place_needs_no_second_buffer(self, quantizer):
        """The eager in-place inverse (``fused=False``'s, and fused BHQ's without torch.compile)
        needs the group sums (here 0.18 N×D) and a block of rows (0.13 N×D), not a copy of
        ``y``: measured 0.4–0.6 N×D, 1.1–1.2 with the copy."""
        growth = peak_growth("bhq", quantizer, "inverse")
        assert growth < 0.8, growth
