"""Fused BHQ (``fused=True``) on the CPU: ``y = T x`` computed on the fly inside the compiled
passes, its group sums in a fixed order (explicit additions, never a compiled scatter-add), the
same transform and grids as the eager plan, the same codes compiled and eager and for any thread
count, both quantizations of a ``grad_output`` in shared passes, and the in-place inverse."""

from __future__ import annotations

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
