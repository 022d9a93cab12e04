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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
from .uniform import affine_encode, affine_steps, fused_affine, group_minmax

__all__ = ["BlockHouseholder", "BlockHouseholderTransform", "build_block_householder"]


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

    def group_sums(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Σ_{r∈g} w_r x_r`` per slot ``g`` for ``x`` (N, D), or (N,) for a vector: each sum runs
        over ``members`` in order (an ``embedding_bag``), so it is the same on every run."""
        rows = x if x.dim() == 2 else x[:, None]
        sums = F.embedding_bag(
            self.members,
            rows,
            self.offsets,
            mode="sum",
            per_sample_weights=None if weights is None else weights[self.members],
        )
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
        return self._spread(u, -self.coef).add_(y).div_(self.row_scale[:, None])

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


def _plan(x2d: Tensor) -> _Plan | None:
    """The transform with each group kept only where it lowers the group's variance bound (see the
    module docstring); ``None`` when N ≤ 2 (no group fits)."""
    if x2d.shape[0] <= 2:
        return None
    low_x, high_x = group_minmax(x2d, "row")
    spans = (high_x.double() - low_x.double()).squeeze(1)  # float64: finite for finite rows
    paper = _paper_transform(x2d, spans)
    y = paper.forward(x2d)
    low_y, high_y = group_minmax(y, "row")
    spans_y = (high_y.double() - low_y.double()).squeeze(1)
    # Per group, (4/D)·bound with and without the transform (the factor B² cancels too). A NaN or
    # Inf makes both non-finite, so the comparison fails and the group stays plain.
    reflected = paper.group_sums(spans_y.square() * paper.inverse_column_norms_sq())
    keep = (reflected < paper.group_sums(spans.square()))[paper.group]
    # A group led by a subnormal range stays plain too: there the transformed values' rounding to
    # the float grid (half the smallest subnormal) is not small against the quantization noise, so
    # it would bias them, while PSQ's grid is exact.
    leader = paper.members[paper.offsets[paper.group]]
    keep &= spans[leader] >= torch.finfo(x2d.dtype).tiny
    transform = dataclasses.replace(
        paper,
        v=torch.where(keep, paper.v, torch.zeros_like(paper.v)),
        coef=torch.where(keep, paper.coef, torch.zeros_like(paper.coef)),
        row_scale=torch.where(keep, paper.row_scale, torch.ones_like(paper.row_scale)),
    )
    keep = keep[:, None]
    # The rows left alone are x's own (in place: y is ours, and a copy would cost a fresh N×D).
    y = torch.where(keep, y, x2d, out=y)
    return _Plan(transform, y, torch.where(keep, low_y, low_x), torch.where(keep, high_y, high_x))


def build_block_householder(x2d: Tensor) -> BlockHouseholderTransform | None:
    """The BHQ transform for the rows of ``x2d`` (N, D); ``None`` when N ≤ 2 (no group fits)."""
    plan = _plan(x2d)
    return None if plan is None else plan.transform


# Fused, only the rounding is compiled: the transform's group sums stay eager.
fused_affine_encode = LazyCompiled(affine_encode)


@register_quantizer("bhq")
class BlockHouseholder(Quantizer):
    """BHQ: per-row quantization after a block Householder transform of the rows (docs/method.md
    §5), applied to the groups whose variance bound it lowers (see the module docstring).

    Needs at least 3 rows to form a group; with N ≤ 2 it is exactly PSQ. A NaN or ±Inf makes the
    output of its group NaN.
    """

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        check_float(x, self.name)
        x2d = as_rows(x).to(compute_dtype(x)).contiguous()
        plan = _plan(x2d)
        noise = self.noise(generator, x2d.device)
        if plan is None:
            codes, scale, bias = self.kernel(fused_affine)(
                x2d, noise, self.bits, "row", self.rounding
            )
            return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype)
        # Eager, the rounding overwrites y (a fresh N×D buffer per call would cost page faults);
        # compiled, it reads y and keeps its intermediates in registers.
        scratch = None if self.fused else plan.y
        codes, scale, bias = self.kernel(fused_affine_encode)(
            plan.y, plan.low, plan.high, self.bits, self.rounding, noise, scratch
        )
        return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype, plan.transform)

    def variance_bound(self, x: Tensor) -> Tensor:
        """``(D/4)·Σ_i Δ_i² ‖T⁻¹e_i‖²``, Δ_i the step of row i of ``T x`` (docs/method.md §4),
        with the transform :meth:`encode` uses (float64).

        That form needs independent zero-mean noise per element (stochastic rounding); for
        nearest rounding the bound is ``‖T⁻¹‖₂²·(D/4)·Σ_i Δ_i²``.
        """
        check_float(x, self.name)
        x2d = as_rows(x).to(compute_dtype(x)).contiguous()
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
