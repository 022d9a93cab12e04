"""BHQ: block Householder quantization of a gradient (docs/method.md §4–5).

Rows are sorted by range; each large-range row leads a group of small-range rows, and a scaled
Householder reflection spreads the leader's magnitude over its group before per-row stochastic
rounding, so the group's independent rounding noises average out. With ``T`` that transform,
``Q(x) = T⁻¹ PSQ(T x)``, which is unbiased because ``T`` is a fixed (data-dependent but
noise-independent) invertible map.

Beyond the paper (this project's addition): each group's share of the variance bound is cheap to
compute, so a group keeps its reflection and row scaling only where they lower it, i.e. where
``(D/4)·Σ_{i∈g} Δ_i(Tx)²‖T⁻¹e_i‖² < (D/4)·Σ_{i∈g} Δ_i(x)²`` (plain per-row quantization). The other
groups become identity rows (``v = 0``, ``s = 1``) and are quantized as PSQ would, so BHQ's bound is
never above PSQ's (for stochastic rounding; the measured error follows where the bounds are tight):
rows of similar range, where the paper's transform costs variance, are left alone. So is a group led
by a subnormal range, whose transformed values the float grid could not hold without bias. The
choice depends on ``x`` only, never on the noise, so BHQ stays unbiased.

``T = Pᵀ · blockdiag(H_n) · P · diag(s)`` is applied structurally, never as a dense N×N matrix:
a row scaling, then per group ``x − 2v(vᵀx)/‖v‖²``. The group sums ``vᵀx`` are ``embedding_bag``
sums over the rows laid out group by group: each sum runs in a fixed order on every device (no
atomic scatter-add), so the codes are reproducible on a GPU and for any thread count. A transform
costs a few passes over the N×D tensor; nothing loops in Python or syncs with the device. Ranges
and transform parameters are computed in float64, so ranges past the float32 maximum and subnormal
ones both get finite, nonzero row scales.

Fused (``fused=True``) on the CPU, ``T x`` is never materialized: compiled passes compute its rows
on the fly, each row summing its own group in a fixed order (see :func:`_lane_sums`), and the
inverse runs in place (:meth:`BlockHouseholderTransform.inverse_`). The same transform and codes
compiled and eager, and for any thread count. Where ``torch.compile`` is disabled or fails, those
passes would hold many N×D temporaries run eagerly, so fused BHQ materializes ``y`` once instead,
as ``fused=False`` does (the same transform; grids and codes to float32 rounding).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    QuantizedTensor,
    Quantizer,
    as_rows,
    check_float,
    compute_dtype,
    register_quantizer,
)
from .fused import LazyCompiled
from .rounding import Noise
from .uniform import (
    affine_encode,
    affine_params,
    affine_round,
    affine_steps,
    fused_affine,
    group_minmax,
    uniform_spec,
)

__all__ = ["BlockHouseholder", "BlockHouseholderTransform", "build_block_householder"]


# Elements per block of rows of the eager in-place inverse (its only buffer: 4 MiB in float32).
_INVERSE_BLOCK = 2**20
# Groups of more rows than this sum in float64 (float32 sums of 201 rows erred by up to 4 ulp),
# :data:`_SUM_BLOCK` elements per pass (their buffer: 8 MiB), or :data:`_SUM_COLUMNS` columns
# where the rows are many (fewer passes, each a launch on a GPU).
_EXACT_SUM_ROWS = 32
_SUM_BLOCK = 2**20
_SUM_COLUMNS = 128


@dataclass(frozen=True)
class BlockHouseholderTransform:
    """``T = Pᵀ · blockdiag(H_n) · P · diag(s)``, in the original row order.

    Each row belongs to a group, named by a *slot* (the sorted position of the group's leader).
    Row ``r`` has reflection vector entry ``v_r = 1/√n − [r is the leader]``, ``gain = 2/‖v‖²``
    and ``coef_r = gain·v_r``, so ``(H x)_r = x_r − coef_r·(vᵀx)``. A group the transform leaves
    alone has ``v = 0`` and ``s = 1``: its rows pass through exactly.
    """

    group: Tensor  # (N,) long: slot of each row's group
    members: Tensor  # (N,) long: the rows laid out slot by slot, each leader first
    offsets: Tensor  # (slots,) long: where each slot's rows start in ``members``
    v: Tensor  # (N,) v_r of each row
    coef: Tensor  # (N,) v_r · gain of each row
    gain: Tensor  # (N,) gain of each row's group
    row_scale: Tensor  # (N,) s
    # A fused quantizer's transform: the inverse's elementwise pass compiled (the same values as
    # eager, a non-finite group sum spread over its group included).
    fused: bool = False

    def group_sums(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Σ_{r∈g} w_r x_r`` per slot ``g`` for ``x`` (N, D), or (N,) for a vector, in ``x``'s
        dtype: each sum runs over ``members`` in order (an ``embedding_bag``), so it is the same on
        every run. A group of more than :data:`_EXACT_SUM_ROWS` rows sums in float64 (a float32
        sum over 10⁴ rows erred by hundreds of ulp, which the leader's small row scale turned
        into a bias of ``T⁻¹(T x)``), :data:`_SUM_BLOCK` elements (or :data:`_SUM_COLUMNS`
        columns) at a time; on the CPU the smaller groups sum in the input's dtype (float64
        sums cost ~7× there), elsewhere in float64 too (choosing the rows would wait on the
        device)."""
        rows = x if x.dim() == 2 else x[:, None]
        w = every = None if weights is None else weights[self.members]
        members, offsets, large = self.members, self.offsets, None
        if rows.dtype != torch.float64 and rows.device.type == "cpu":
            sizes = torch.diff(offsets, append=offsets.new_tensor([members.numel()]))
            large = sizes > _EXACT_SUM_ROWS
            sums = F.embedding_bag(members, rows, offsets, mode="sum", per_sample_weights=every)
            if not bool(large.any()):  # every group small: the input's dtype alone
                return sums if x.dim() == 2 else sums[:, 0]
            in_large = large[self.group[members]]
            members = members[in_large]
            sizes = sizes[large]
            offsets = sizes.cumsum(0) - sizes
            w = None if w is None else w[in_large]
        # The members' rows, gathered in order: bags over consecutive rows of a float64 copy.
        w = None if w is None else w.double()
        order = torch.arange(members.numel(), device=members.device)
        width = max(_SUM_COLUMNS, _SUM_BLOCK // max(1, members.numel()))
        exact = torch.cat(
            [
                F.embedding_bag(
                    order,
                    rows[members, start : start + width].double(),
                    offsets,
                    mode="sum",
                    per_sample_weights=w,
                ).to(rows.dtype)
                for start in range(0, max(1, rows.shape[1]), width)
            ],
            1,
        )
        if large is None:
            sums = exact
        else:
            sums[large] = exact
        return sums if x.dim() == 2 else sums[:, 0]

    def _spread(self, u: Tensor, weights: Tensor) -> Tensor:
        """``w_r · u[group_r]`` for every row ``r``: bags of one row, so a gather and scaling in one
        pass."""
        return F.embedding_bag(
            self.group[:, None], u, mode="sum", per_sample_weights=weights[:, None]
        )

    def forward(self, x: Tensor) -> Tensor:
        """``s∘x − coef∘u[group]`` with ``u = vᵀ(s∘x)`` per group."""
        u = self.group_sums(x, self.v * self.row_scale)
        return self._spread(u, -self.coef).addcmul_(x, self.row_scale[:, None])

    def inverse(self, y: Tensor) -> Tensor:
        """``(y − coef∘u[group]) / s`` with ``u = vᵀy`` per group (``H_n`` is its own inverse);
        the difference first, as its terms may pass the float maximum once divided by ``s``."""
        u = self.group_sums(y, self.v)
        if self.fused and not _falls_back(fused_inverse_rows, y):
            return fused_inverse_rows(y, u, self.group, self.row_scale, self.coef)
        return self._spread(u, -self.coef).add_(y).div_(self.row_scale[:, None])

    def inverse_(self, y: Tensor) -> Tensor:
        """:meth:`inverse` written over ``y`` (N, D), which is returned. Rows the transform leaves
        alone keep their values, unless their group's sum is not finite (NaN, as
        :meth:`inverse`). On the CPU no second N×D buffer: compiled (a fused quantizer's
        transform), one pass over ``y``; eager, only the rows it changes, a block of them at a
        time (:data:`_INVERSE_BLOCK` elements); where it changes none, ``y`` is not written.
        Elsewhere, eager, ``y.copy_(inverse(y))`` (choosing the rows would wait on the
        device)."""
        u = self.group_sums(y, self.v)
        compiled = self.fused and not _falls_back(fused_inverse_rows_in_place, y)
        if y.device.type != "cpu":
            if compiled:
                fused_inverse_rows_in_place(y, u, self.group, self.row_scale, self.coef)
                return y
            return y.copy_(self._spread(u, -self.coef).add_(y).div_(self.row_scale[:, None]))
        # A sum past the float maximum only marks its rows for the same values again.
        changed = (self.coef != 0) | ~u.sum(1).isfinite()[self.group]
        rows = changed.nonzero().squeeze(1)
        if rows.numel() == 0:
            return y
        if compiled:
            fused_inverse_rows_in_place(y, u, self.group, self.row_scale, self.coef)
            return y
        # inverse's operations on those rows, y + (−coef·u) then / s (the same values), a block
        # of rows at a time through one buffer of the block's size.
        block = max(1, _INVERSE_BLOCK // max(1, y.shape[1]))
        for chunk in rows.split(block):
            part = F.embedding_bag(
                self.group[chunk, None], u, mode="sum", per_sample_weights=-self.coef[chunk, None]
            )
            y.index_add_(0, chunk, part)
            torch.index_select(y, 0, chunk, out=part)
            y.index_copy_(0, chunk, part.div_(self.row_scale[chunk, None]))
        return y

    def inverse_column_norms_sq(self) -> Tensor:
        """``‖T⁻¹ e_i‖² = Σ_r (δ_ri − gain·v_r·v_i)² / s_r²`` from group sums, per row ``i``
        (float64)."""
        v2 = self.v.double().square()
        gain = self.gain.double()
        inv_s2 = self.row_scale.double().reciprocal().square()
        group_sum = self.group_sums(v2 * inv_s2)
        return inv_s2 * (1 - 2 * gain * v2) + gain.square() * v2 * group_sum[self.group]


def _max_abs_householder(n: Tensor) -> Tensor:
    """``max |H_n|`` for ``H_n = I − 2vvᵀ/‖v‖²``, ``v ∝ 1/√n − e₁``: first row and column ``1/√n``,
    the other diagonal entries ``1 − 1/(n − √n)`` and, only for ``n ≥ 3``, the off-diagonal
    entries ``−1/(n − √n)`` among the other rows."""
    root = n.sqrt()
    off = 1 / (n - root)
    others = torch.where(n >= 3, torch.maximum(off, (1 - off).abs()), (1 - off).abs())
    return torch.maximum(1 / root, others)


def _sorted_groups(ranges: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """docs/method.md §5 steps 1–3 in sorted order: (order, group slot of each sorted row,
    is_large)."""
    n_rows = ranges.shape[0]
    order = torch.argsort(ranges, descending=True)
    lam = ranges[order]  # (N,) descending
    csum = lam.cumsum(0)
    # Step 2: the first k (small rows) with k·λ_(N−k) > Σ_{i≤N−k} λ_(i); k = N−1 always qualifies.
    k = torch.arange(1, n_rows, device=ranges.device)
    qualifies = k * lam[n_rows - k - 1] > csum[n_rows - k - 1]
    k_small = qualifies.to(torch.int8).argmax() + 1  # k[i] = i + 1; a 0-d tensor, no sync
    n_large = n_rows - k_small
    position = torch.arange(n_rows, device=ranges.device)
    is_large = position < n_large
    # Step 3: large row g takes small rows j with round(c_{g-1}) <= j < round(c_g).
    bounds = torch.round(k_small * csum / csum.gather(0, (n_large - 1).reshape(1)))
    bounds = torch.where(is_large, bounds, torch.full_like(bounds, float("inf")))
    small_index = (position - n_large).clamp(min=0).to(bounds.dtype)
    small_slot = torch.searchsorted(bounds, small_index, right=True)
    return order, torch.where(is_large, position, small_slot), is_large


def _paper_transform(x2d: Tensor, spans: Tensor) -> BlockHouseholderTransform:
    """docs/method.md §5's transform, every group reflected, for rows of ranges ``spans``
    (float64)."""
    n_rows = x2d.shape[0]
    ranges = torch.nan_to_num(spans, nan=0.0, posinf=0.0)
    info = torch.finfo(x2d.dtype)  # keeps the row scales within x2d's dtype
    ranges = ranges + (ranges.amax() * info.eps + info.tiny)
    order, slot_sorted, is_large = _sorted_groups(ranges)
    lam = ranges[order]

    by_slot = torch.argsort(slot_sorted, stable=True)  # sorted positions, slot by slot
    slot_ids = torch.arange(n_rows + 1, device=lam.device)
    starts = torch.searchsorted(slot_sorted[by_slot], slot_ids)  # of each slot in by_slot
    size = (starts[1:] - starts[:-1]).to(lam.dtype)  # rows per slot (0 for unused slots)
    small_lam = torch.where(is_large, torch.zeros_like(lam), lam)
    top_small = torch.zeros_like(lam).scatter_reduce_(0, slot_sorted, small_lam, "amax")
    n = size[slot_sorted].clamp(min=2)  # every group has ≥ 2 rows by construction
    inv_sqrt_n = n.rsqrt()
    # Step 4: s₁ = (λ₁/√n)^(−1/3) for leaders, s₂ = (λ₂·max|H_n| / (n−1))^(−1/3) for small rows.
    w_large = lam * inv_sqrt_n
    w_small = top_small[slot_sorted] * _max_abs_householder(n) / (n - 1)
    scale = torch.where(is_large, w_large, w_small).pow(-1.0 / 3.0)
    v = inv_sqrt_n - is_large.to(lam.dtype)
    gain = 1 / (1 - inv_sqrt_n)

    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_rows, device=order.device)  # sorted position of each row
    # Slots in use are 0..n_large-1. Known on the CPU; on an accelerator all N slots are kept
    # (reading the count would wait on the device): the unused ones are empty, costing work only.
    slots = int(is_large.sum()) if is_large.device.type == "cpu" else n_rows
    dtype = x2d.dtype
    return BlockHouseholderTransform(
        group=slot_sorted[rank],
        members=order[by_slot],
        offsets=starts[:slots],
        v=v[rank].to(dtype),
        coef=(v * gain)[rank].to(dtype),
        gain=gain[rank].to(dtype),
        row_scale=scale[rank].to(dtype),
    )


@dataclass(frozen=True)
class _Plan:
    """What BHQ quantizes: the rows of ``y = T x`` on the per-row grids ``[low, high]``."""

    transform: BlockHouseholderTransform
    y: Tensor  # (N, D)
    low: Tensor  # (N, 1)
    high: Tensor  # (N, 1)


def _spans(low: Tensor, high: Tensor) -> Tensor:
    """Row ranges in float64 (finite for finite rows), (N,)."""
    return (high.double() - low.double()).squeeze(1)


def _decide(
    paper: BlockHouseholderTransform,
    spans: Tensor,
    ranges_x: tuple[Tensor, Tensor],
    ranges_y: tuple[Tensor, Tensor],
    dtype: torch.dtype,
) -> tuple[BlockHouseholderTransform, Tensor, Tensor, Tensor]:
    """The paper's transform kept only for the groups whose variance bound it lowers (see the
    module docstring): (transform, keep (N,) bool, low, high of the rows BHQ quantizes)."""
    (low_x, high_x), (low_y, high_y) = ranges_x, ranges_y
    spans_y = _spans(low_y, high_y)
    # Per group, (4/D)·bound with and without the transform (the factor B² cancels too). A NaN or
    # Inf makes both non-finite, so the comparison fails and the group stays plain.
    reflected = paper.group_sums(spans_y.square() * paper.inverse_column_norms_sq())
    keep = (reflected < paper.group_sums(spans.square()))[paper.group]
    # A group led by a subnormal range stays plain too: there the transformed values' rounding to
    # the float grid (half the smallest subnormal) is not small against the quantization noise, so
    # it would bias them, while PSQ's grid is exact.
    leader = paper.members[paper.offsets[paper.group]]
    keep &= spans[leader] >= torch.finfo(dtype).tiny
    transform = dataclasses.replace(
        paper,
        v=torch.where(keep, paper.v, torch.zeros_like(paper.v)),
        coef=torch.where(keep, paper.coef, torch.zeros_like(paper.coef)),
        row_scale=torch.where(keep, paper.row_scale, torch.ones_like(paper.row_scale)),
    )
    column = keep[:, None]
    low = torch.where(column, low_y, low_x)
    return transform, keep, low, torch.where(column, high_y, high_x)


def _plan(x2d: Tensor) -> _Plan | None:
    """The transform with each group kept only where it lowers the group's variance bound (see the
    module docstring), and ``y = T x`` materialized (the eager path); ``None`` when N ≤ 2 (no
    group fits)."""
    if x2d.shape[0] <= 2:
        return None
    low_x, high_x = group_minmax(x2d, "row")
    spans = _spans(low_x, high_x)
    paper = _paper_transform(x2d, spans)
    y = paper.forward(x2d)
    transform, keep, low, high = _decide(
        paper, spans, (low_x, high_x), group_minmax(y, "row"), x2d.dtype
    )
    # The rows left alone are x's own (in place: y is ours, and a copy would cost a fresh N×D).
    y = torch.where(keep[:, None], y, x2d, out=y)
    return _Plan(transform, y, low, high)


def build_block_householder(x2d: Tensor) -> BlockHouseholderTransform | None:
    """The BHQ transform for the rows of ``x2d`` (N, D); ``None`` when N ≤ 2 (no group fits)."""
    plan = _plan(x2d)
    return None if plan is None else plan.transform


# Fused (``fused=True``): neither ``y = T x`` nor its group sums ``u = vᵀ(s∘x)`` are materialized
# (fresh N×D buffers cost page faults every call). Two compiled passes compute the rows of ``y``
# on the fly, one for their ranges (which decide the groups kept), one for the rounding. A row of
# a group of at most _LANES rows sums its group itself: it reads the group's rows (its own among
# them) and adds them, weighted, in the group's order, left to right. Explicit additions in a fixed
# order, not a reduction: the same roundings compiled and eager and for any thread count (a
# compiled scatter-add would accumulate in a thread-dependent order and the codes would stop being
# reproducible from the seed), and every row of a group gets the same sum. A larger group's sum
# is computed once, beforehand, the same way: its rows in chunks of _LANES, then the chunks'
# partial sums _LANES at a time (:func:`_ordered_group_sums`). A padding lane reads a row of the
# group with weight 0.
_LANES = 4


def _lane_sums(rows: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """``Σ_j weight[c, j]·rows[index[c, j]]`` for every ``c``, the lanes added in order."""
    total = weight[:, :1] * rows[index[:, 0]]
    for lane in range(1, _LANES):
        total = total + weight[:, lane : lane + 1] * rows[index[:, lane]]
    return total


def _transformed(x2d: Tensor, rows: tuple[Tensor, ...], own: Tensor | None = None) -> Tensor:
    """The rows of ``y = T x``, ``s∘x − coef∘u[group]``. ``rows``: each row's lanes (row ids and
    weights, (N, L)), the sums of the large groups, each row's large group and whether it has
    one, its scale and coefficient (see :func:`_row_lanes`); ``own``: the rows of ``x`` they
    are for, when not ``x2d`` itself."""
    index, weight, large_sums, large_group, large, scale, coef = rows[:7]
    sums = torch.where(large[:, None], large_sums[large_group], _lane_sums(x2d, index, weight))
    return (x2d if own is None else own) * scale[:, None] - coef[:, None] * sums


def _in_order(rows: tuple[Tensor, ...], order: Tensor) -> tuple[Tensor, ...]:
    """``rows`` (see :func:`_transformed`; and the kept flags) for the rows of ``x`` in
    ``order``."""
    return tuple(t if i == 2 else t[order] for i, t in enumerate(rows))


def _transformed_ranges(
    x2d: Tensor, rows: tuple[Tensor, ...], order: Tensor
) -> tuple[Tensor, Tensor]:
    """The ranges of the rows of ``y``, in ``order`` (group by group: the rows a group's rows
    read are then read once from memory, the others from the cache)."""
    return group_minmax(_transformed(x2d, _in_order(rows, order), x2d[order]), "row")


def _transformed_or_plain(x2d: Tensor, rows: tuple[Tensor, ...]) -> Tensor:
    """``y`` on the kept rows, ``x`` on the others (``rows[7]``: kept)."""
    return torch.where(rows[7][:, None], _transformed(x2d, rows), x2d)


# The roundings run in row order: in group order (as the ranges) they were no faster (their
# arithmetic, not their reads, bounds them), and the codes' writes would be scattered.
def _round_transformed(
    x2d: Tensor, rows: tuple[Tensor, ...], params: tuple[Tensor, ...], bits: int, rounding: str,
    noise: Noise,
) -> Tensor:  # fmt: skip
    return affine_round(_transformed_or_plain(x2d, rows), params, bits, rounding, noise)


def _round_transformed_two_way(
    x2d: Tensor, rows: tuple[Tensor, ...], params_g: tuple[Tensor, ...],
    params_h: tuple[Tensor, ...], spec_g: tuple, spec_h: tuple, noise_g: Noise, noise_h: Noise,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """BHQ's codes of ``x`` and the column quantizer's, in one loop over ``x``."""
    y = _transformed_or_plain(x2d, rows)
    return (
        affine_round(y, params_g, spec_g[0], spec_g[3], noise_g),
        affine_round(x2d, params_h, spec_h[0], spec_h[3], noise_h),
    )


def _row_ranges(x2d: Tensor) -> tuple[Tensor, Tensor]:
    return group_minmax(x2d, "row")


def _two_way_ranges(x2d: Tensor, spec_h: tuple) -> tuple[Tensor, ...]:
    """The rows' ranges and the column quantizer's grid parameters, in one pass over ``x``."""
    low, high = group_minmax(x2d, "row")
    return low, high, affine_params(*group_minmax(x2d, spec_h[1]), spec_h[0])


def _inverse_rows(y: Tensor, sums: Tensor, group: Tensor, scale: Tensor, coef: Tensor) -> Tensor:
    """``T⁻¹ y`` from the group sums ``u = vᵀy``: ``(y − coef∘u[group]) / s`` on every row, as
    the eager inverse: on a row left alone (``coef = 0``, ``s = 1``) ``y`` itself, or NaN where
    its group's sum is not finite."""
    return (y - coef[:, None] * sums[group]) / scale[:, None]


def _inverse_rows_in_place(
    y: Tensor, sums: Tensor, group: Tensor, scale: Tensor, coef: Tensor
) -> None:
    y.copy_(_inverse_rows(y, sums, group, scale, coef))


fused_lane_sums = LazyCompiled(_lane_sums)
# Fused off the CPU: y materialized (:func:`_plan`), its rounding compiled.
fused_affine_encode = LazyCompiled(affine_encode)
fused_row_ranges = LazyCompiled(_row_ranges)
fused_two_way_ranges = LazyCompiled(_two_way_ranges)
fused_transformed_ranges = LazyCompiled(_transformed_ranges)
fused_round_transformed = LazyCompiled(_round_transformed)
fused_round_transformed_two_way = LazyCompiled(_round_transformed_two_way)
fused_inverse_rows = LazyCompiled(_inverse_rows)
fused_inverse_rows_in_place = LazyCompiled(_inverse_rows_in_place)
# The passes fused BHQ runs on the fly, by encode and by encode_two_way.
_ENCODE_KERNELS = (
    fused_row_ranges,
    fused_lane_sums,
    fused_transformed_ranges,
    fused_round_transformed,
)
_TWO_WAY_KERNELS = (
    fused_two_way_ranges, fused_lane_sums, fused_transformed_ranges,
    fused_round_transformed_two_way,
)  # fmt: skip


def _first_lanes(
    order: Tensor, weight: Tensor, starts: Tensor, sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """Row ids and weights (G, L) of the first :data:`_LANES` entries of each group, the groups
    laid out one after the other in ``order`` from ``starts`` with ``sizes``; padding lanes take
    the group's first entry with weight 0."""
    position = starts[:, None] + torch.arange(_LANES, device=starts.device)
    valid = position < (starts + sizes)[:, None]
    position = torch.where(valid, position, starts[:, None]).clamp(max=order.numel() - 1)
    lane_weight = weight[position]
    return order[position], torch.where(valid, lane_weight, torch.zeros_like(lane_weight))


def _ordered_group_sums(
    x2d: Tensor, order: Tensor, weight: Tensor, sizes: Tensor, kernel: Callable[[LazyCompiled], Any]
) -> Tensor:
    """``Σ_{r∈g} w_r x_r`` per group (groups laid out in ``order`` with ``sizes``, ``weight`` in
    that order), by compiled passes of :data:`_LANES` chunks in a fixed order; the count of passes
    is read from the sizes (CPU)."""
    rows = x2d
    while True:
        chunks = sizes.add(_LANES - 1).div(_LANES, rounding_mode="floor").clamp(min=1)
        within = torch.arange(int(chunks.sum()), device=sizes.device)
        chunk_group = torch.repeat_interleave(
            torch.arange(sizes.numel(), device=sizes.device), chunks
        )
        within = within - (chunks.cumsum(0) - chunks)[chunk_group]
        starts = (sizes.cumsum(0) - sizes)[chunk_group]
        begin = starts + _LANES * within
        left = (starts + sizes[chunk_group] - begin).clamp(min=0)
        index, lane_weight = _first_lanes(order, weight, begin, left)
        rows = kernel(fused_lane_sums)(rows, index, lane_weight)
        if bool((chunks == 1).all()):
            return rows
        sizes, order = chunks, torch.arange(rows.shape[0], device=rows.device)
        weight = torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)


def _row_lanes(
    t: BlockHouseholderTransform, x2d: Tensor, kernel: Callable[[LazyCompiled], Any]
) -> tuple[Tensor, ...]:
    """What :func:`_transformed` takes for the transform ``t`` (CPU): each row's group as lanes
    when it has at most :data:`_LANES` rows, else the sums of the large groups, computed here."""
    n = t.members.numel()
    sizes = torch.diff(t.offsets, append=t.offsets.new_tensor([n]))
    weight = (t.v * t.row_scale)[t.members]  # in members order
    index, lane_weight = _first_lanes(t.members, weight, t.offsets, sizes)
    large_slot = sizes > _LANES
    large = large_slot[t.group]
    own = torch.arange(n, device=x2d.device)[:, None].expand(n, _LANES)
    index = torch.where(large[:, None], own, index[t.group])
    lane_weight = torch.where(large[:, None], 0.0, lane_weight[t.group])
    if bool(large_slot.any()):
        slot_of = torch.repeat_interleave(torch.arange(sizes.numel(), device=x2d.device), sizes)
        in_large = large_slot[slot_of]  # in members order
        large_sums = _ordered_group_sums(
            x2d, t.members[in_large], weight[in_large], sizes[large_slot], kernel
        )
    else:
        large_sums = x2d.new_zeros(1, x2d.shape[1])
    large_group = (large_slot.cumsum(0) - 1).clamp(min=0)[t.group]
    return index, lane_weight, large_sums, large_group, large, t.row_scale, t.coef


def _falls_back(kernel: Any, data: Tensor) -> bool:
    """Whether ``kernel`` (what :meth:`~.base.Quantizer.kernel` gave) is a compiled kernel that
    runs eagerly on ``data``: ``torch.compile`` disabled, or its compilation failed before for
    that dtype and device. Not so for an eager function asked for explicitly (``kernel.fn``, as
    the tests' reference runs)."""
    if not isinstance(kernel, LazyCompiled):
        return False
    # TORCH_COMPILE_DISABLE=1 sets the config; TORCHDYNAMO_DISABLE=1 is read by torch.compile.
    disabled = torch._dynamo.config.disable or os.environ.get("TORCHDYNAMO_DISABLE") == "1"
    return bool(disabled) or not kernel.compiles(data)


def _on_the_fly(
    x2d: Tensor, kernel: Callable[[LazyCompiled], Any], kernels: tuple[LazyCompiled, ...]
) -> bool:
    """Whether fused BHQ computes ``y`` inside its passes (:func:`_fused_plan`): on the CPU,
    where the count of summing passes can be read without waiting on a device, and with those
    passes (``kernels``) compiled. Run eagerly they would hold many N×D temporaries, so where
    ``torch.compile`` is disabled or failed fused BHQ takes the eager plan (:func:`_plan`),
    ``y`` materialized once: the same transform, its grids and codes to float32 rounding."""
    return x2d.device.type == "cpu" and not any(_falls_back(kernel(k), x2d) for k in kernels)


@dataclass(frozen=True)
class _FusedPlan:
    """What fused BHQ quantizes, ``y = T x`` described (:func:`_transformed`'s ``rows`` and which
    rows are kept), not materialized."""

    transform: BlockHouseholderTransform
    rows: tuple[Tensor, ...]
    low: Tensor  # (N, 1)
    high: Tensor  # (N, 1)


def _fused_plan(
    x2d: Tensor, ranges_x: tuple[Tensor, Tensor], kernel: Callable[[LazyCompiled], Any]
) -> _FusedPlan:
    """:func:`_plan`'s transform and grids (N > 2, CPU) from the rows' ranges, ``y``'s ranges
    computed on the fly by ``kernel(fused_transformed_ranges)`` (compiled, or its eager
    function)."""
    spans = _spans(*ranges_x)
    paper = _paper_transform(x2d, spans)
    rows = _row_lanes(paper, x2d, kernel)
    low_y, high_y = kernel(fused_transformed_ranges)(x2d, rows, paper.members)
    rank = torch.empty_like(paper.members)
    rank[paper.members] = torch.arange(rank.numel(), device=rank.device)
    ranges_y = low_y[rank], high_y[rank]
    transform, keep, low, high = _decide(paper, spans, ranges_x, ranges_y, x2d.dtype)
    # The rows left alone need no sums: their lanes read themselves, with weight 0.
    index, lane_weight, large_sums, large_group, large = rows[:5]
    own = torch.arange(x2d.shape[0], device=x2d.device)[:, None].expand_as(index)
    column = keep[:, None]
    rows = (
        torch.where(column, index, own),
        torch.where(column, lane_weight, 0.0),
        large_sums,
        large_group,
        large & keep,
        transform.row_scale,
        transform.coef,
        keep,
    )
    return _FusedPlan(dataclasses.replace(transform, fused=True), rows, low, high)


@register_quantizer("bhq")
class BlockHouseholder(Quantizer):
    """BHQ: per-row quantization after a block Householder transform of the rows (docs/method.md
    §5), applied to the groups whose variance bound it lowers (see the module docstring).

    Needs at least 3 rows to form a group; with N ≤ 2 it is exactly PSQ. A NaN or ±Inf makes the
    output of its group NaN.
    """

    column_equivariant = True  # row ranges, and a transform that mixes rows column by column

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        check_float(x, self.name)
        x2d = as_rows(x).detach().to(compute_dtype(x)).contiguous()
        if x2d.shape[0] <= 2:  # no group fits: PSQ
            noise = self.noise(generator, x2d.device)
            codes, scale, bias = self.kernel(fused_affine)(
                x2d, noise, self.bits, "row", self.rounding
            )
            return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype)
        if self.fused and _on_the_fly(x2d, self.kernel, _ENCODE_KERNELS):
            plan = _fused_plan(x2d, self.kernel(fused_row_ranges)(x2d), self.kernel)
            noise = self.noise(generator, x2d.device)
            params = affine_params(plan.low, plan.high, self.bits)
            codes = self.kernel(fused_round_transformed)(
                x2d, plan.rows, params[:3], self.bits, self.rounding, noise
            )
            return self._encoded(codes, params, x, plan.transform)
        plan = _plan(x2d)
        noise = self.noise(generator, x2d.device)
        # Eager (fused=False, or torch.compile disabled), the rounding overwrites y (a fresh N×D
        # buffer per call would cost page faults); compiled (fused, off the CPU), it reads y and
        # keeps its intermediates in registers.
        compiled = self.fused and not _falls_back(self.kernel(fused_affine_encode), plan.y)
        scratch = None if compiled else plan.y
        codes, scale, bias = self.kernel(fused_affine_encode)(
            plan.y, plan.low, plan.high, self.bits, self.rounding, noise, scratch
        )
        return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype, plan.transform)

    def encode_two_way(
        self,
        x: Tensor,
        column_quantizer: Quantizer,
        generator: torch.Generator | None = None,
        compiled: bool = True,
    ) -> tuple[QuantizedTensor, QuantizedTensor] | None:
        """``(self.encode(x), column_quantizer.encode(x))``, the same codes, sharing the passes
        over ``x``: one for the rows' ranges and the column quantizer's statistics, one for both
        roundings (:func:`~.twoway.encode_two_way` calls this). ``None`` where it does not apply
        (this quantizer or the column one not fused, a symmetric column grid, N ≤ 2, off the
        CPU, or ``torch.compile`` disabled or failing, see :func:`_on_the_fly`): the caller then
        encodes one after the other. ``compiled=False`` runs the same code eagerly."""
        check_float(x, self.name)
        spec_h = uniform_spec(column_quantizer)
        x2d = as_rows(x)
        if not self.fused or spec_h is None or spec_h[2] or x2d.shape[0] <= 2:
            return None
        kernel: Callable[[LazyCompiled], Any] = (lambda k: k) if compiled else (lambda k: k.fn)
        if not _on_the_fly(x2d, kernel, _TWO_WAY_KERNELS):
            return None
        x2d = x2d.detach().to(compute_dtype(x)).contiguous()
        low_x, high_x, params_h = kernel(fused_two_way_ranges)(x2d, spec_h)
        plan = _fused_plan(x2d, (low_x, high_x), kernel)
        noise_g = self.noise(generator, x2d.device)
        noise_h = column_quantizer.noise(generator, x2d.device)
        params_g = affine_params(plan.low, plan.high, self.bits)
        spec_g = (self.bits, "row", False, self.rounding)
        codes_g, codes_h = kernel(fused_round_transformed_two_way)(
            x2d, plan.rows, params_g[:3], params_h[:3], spec_g, spec_h, noise_g, noise_h
        )
        return (
            self._encoded(codes_g, params_g, x, plan.transform),
            QuantizedTensor(codes_h, *params_h[3:], column_quantizer.bits, x.shape, x.dtype),
        )

    def _encoded(
        self, codes: Tensor, params: tuple[Tensor, ...], x: Tensor, transform: Any
    ) -> QuantizedTensor:
        scale, bias = params[3:]
        return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype, transform)

    def variance_bound(self, x: Tensor) -> Tensor:
        """``(D/4)·Σ_i Δ_i² ‖T⁻¹e_i‖²``, Δ_i the step of row i of ``T x`` (docs/method.md §4),
        with the transform :meth:`encode` uses (float64).

        That form needs independent zero-mean noise per element (stochastic rounding); for
        nearest rounding the bound is ``‖T⁻¹‖₂²·(D/4)·Σ_i Δ_i²``.
        """
        check_float(x, self.name)
        if not torch.isfinite(x).all():  # no bound (NaN would pass every comparison)
            return torch.tensor(math.inf, dtype=torch.float64, device=x.device)
        x2d = as_rows(x).to(compute_dtype(x)).contiguous()
        plan: _Plan | _FusedPlan | None
        on_the_fly = self.fused and _on_the_fly(x2d, self.kernel, _ENCODE_KERNELS)
        if on_the_fly and x2d.shape[0] > 2:  # the plan encode uses
            plan = _fused_plan(x2d, self.kernel(fused_row_ranges)(x2d), self.kernel)
        else:
            plan = _plan(x2d)
        if plan is None:
            low, high = group_minmax(x2d, "row")
        else:
            low, high = plan.low, plan.high
        steps = affine_steps(low, high, 2**self.bits - 1).squeeze(1).double()
        if plan is None:
            norms = torch.ones_like(steps)
        elif self.rounding == "stochastic":
            norms = plan.transform.inverse_column_norms_sq()
        else:
            # Nearest rounding errs deterministically, so the rows' errors do not cancel in
            # expectation: bound ‖T⁻¹e‖² by ‖T⁻¹‖₂²‖e‖², with ‖T⁻¹‖₂ = max 1/s (H is orthogonal).
            inv_s2 = plan.transform.row_scale.double().reciprocal().square()
            norms = inv_s2.amax().expand_as(steps)
        return (x2d.shape[1] * steps.square() * norms / 4).sum()
