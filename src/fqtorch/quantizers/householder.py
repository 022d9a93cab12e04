"""BHQ: block Householder quantization of a gradient (PAPER.md §4–5).

Rows are sorted by range; each large-range row leads a group of small-range rows, and a scaled
Householder reflection spreads the leader's magnitude over its group before per-row stochastic
rounding, so the group's independent rounding noises average out. With ``T`` that transform,
``Q(x) = T⁻¹ PSQ(T x)``, which is unbiased because ``T`` is a fixed (data-dependent but
noise-independent) invertible map.

``T = Pᵀ · blockdiag(H_n) · P · diag(s)`` is applied structurally, never as a dense N×N matrix:
a row scaling, then per group ``x − 2v(vᵀx)/‖v‖²`` computed from group sums (``index_add``), so a
transform costs a few passes over the N×D tensor; nothing loops in Python or syncs with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    QuantizedTensor,
    Quantizer,
    as_rows,
    check_float,
    compute_dtype,
    register_quantizer,
)
from .uniform import fused_affine, group_minmax

__all__ = ["BlockHouseholder", "BlockHouseholderTransform", "build_block_householder"]


@dataclass(frozen=True)
class BlockHouseholderTransform:
    """``T = Pᵀ · blockdiag(H_n) · P · diag(s)``, in the original row order.

    Each row belongs to a group, named by a *slot* (the sorted position of the group's leader).
    Row ``r`` has reflection vector entry ``v_r = 1/√n − [r is the leader]``; ``gain = 2/‖v‖²``.
    """

    group: Tensor  # (N,) long: slot of each row's group
    leader: Tensor  # (N,) long: original row index of the leader of slot g (slots unused: any)
    slot_inv_sqrt_n: Tensor  # (N,) 1/√n of slot g's group (0 for unused slots)
    coef: Tensor  # (N,) v_r · gain of each row
    v: Tensor  # (N,) v_r of each row
    gain: Tensor  # (N,) gain of each row's group
    row_scale: Tensor  # (N,) s
    # Slots in use are 0..slots-1. Known on the CPU; on an accelerator it stays N (reading the
    # group count would wait on the device), and the unused slots cost work, not correctness.
    slots: int | None = None

    def reflect(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``blockdiag(H_n) x`` in the original row order; ``H_n`` is its own inverse.
        ``inplace=True`` overwrites ``x`` (a temporary of the caller's)."""
        slots = x.shape[0] if self.slots is None else self.slots
        sums = x.new_zeros(slots, x.shape[1]).index_add_(0, self.group, x)  # one row per slot
        u = sums.mul_(self.slot_inv_sqrt_n[:slots, None]).sub_(x[self.leader[:slots]])  # vᵀx
        if inplace:
            return x.addcmul_(self.coef[:, None], u[self.group], value=-1)
        return torch.addcmul(x, self.coef[:, None], u[self.group], value=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.reflect(x * self.row_scale[:, None], inplace=True)

    def inverse(self, y: Tensor) -> Tensor:
        return self.reflect(y).div_(self.row_scale[:, None])

    def inverse_column_norms_sq(self) -> Tensor:
        """``‖T⁻¹ e_i‖² = Σ_r (δ_ri − gain·v_r·v_i)² / s_r²`` from group sums, per row ``i``."""
        inv_s2 = self.row_scale.reciprocal().square()
        group_sum = torch.zeros_like(inv_s2).index_add_(0, self.group, self.v.square() * inv_s2)
        v2 = self.v.square()
        return inv_s2 * (1 - 2 * self.gain * v2) + self.gain.square() * v2 * group_sum[self.group]


def _max_abs_householder(n: Tensor) -> Tensor:
    """``max |H_n|`` for ``H_n = I − 2vvᵀ/‖v‖²``, ``v ∝ 1/√n − e₁``: first column ``1/√n``, then
    off-diagonal ``1/(n − √n)`` and diagonal ``1 − 1/(n − √n)`` for the other rows."""
    root = n.sqrt()
    off = 1 / (n - root)
    return torch.maximum(torch.maximum(1 / root, off), (1 - off).abs())


def _sorted_groups(ranges: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PAPER.md §5 steps 1–3 in sorted order: (order, group slot of each sorted row, is_large)."""
    n_rows = ranges.shape[0]
    order = torch.argsort(ranges, descending=True)
    lam = ranges[order]  # (N,) descending
    csum = lam.cumsum(0)
    # Step 2: the first k (small rows) with k·λ_(N−k) > Σ_{i≤N−k} λ_(i); k = N−1 always qualifies.
    k = torch.arange(1, n_rows, device=ranges.device)
    qualifies = k * lam[n_rows - k - 1] > csum[n_rows - k - 1]
    k_small = k[qualifies.to(torch.int8).argmax()]
    n_large = n_rows - k_small
    position = torch.arange(n_rows, device=ranges.device)
    is_large = position < n_large
    # Step 3: large row g takes small rows j with round(c_{g-1}) <= j < round(c_g).
    bounds = torch.round(k_small * csum / csum[n_large - 1])
    bounds = torch.where(is_large, bounds, torch.full_like(bounds, float("inf")))
    small_index = (position - n_large).clamp(min=0).to(bounds.dtype)
    small_slot = torch.searchsorted(bounds, small_index, right=True)
    return order, torch.where(is_large, position, small_slot), is_large


def build_block_householder(x2d: Tensor) -> BlockHouseholderTransform | None:
    """The BHQ transform for the rows of ``x2d`` (N, D); ``None`` when N ≤ 2 (no group fits)."""
    n_rows = x2d.shape[0]
    if n_rows <= 2:
        return None
    low, high = group_minmax(x2d, "row")
    ranges = torch.nan_to_num((high - low).squeeze(1), nan=0.0, posinf=0.0)
    info = torch.finfo(ranges.dtype)
    ranges = ranges + (ranges.amax() * info.eps + info.tiny)
    order, slot_sorted, is_large = _sorted_groups(ranges)
    lam = ranges[order]

    size = torch.zeros_like(lam).index_add_(0, slot_sorted, torch.ones_like(lam))  # per slot
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
    slot_inv_sqrt_n = torch.where(size > 0, size.clamp(min=1).rsqrt(), torch.zeros_like(size))
    return BlockHouseholderTransform(
        group=slot_sorted[rank],
        leader=order,
        slot_inv_sqrt_n=slot_inv_sqrt_n,
        coef=(v * gain)[rank],
        v=v[rank],
        gain=gain[rank],
        row_scale=scale[rank],
        slots=int(is_large.sum()) if is_large.device.type == "cpu" else None,
    )


@register_quantizer("bhq")
class BlockHouseholder(Quantizer):
    """BHQ: per-row quantization after a block Householder transform of the rows (PAPER.md §5).

    Needs at least 3 rows to form a group; with N ≤ 2 it is exactly PSQ. A NaN or ±Inf makes the
    output of its group NaN.
    """

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        check_float(x, self.name)
        x2d = as_rows(x).to(compute_dtype(x))
        transform = build_block_householder(x2d)
        y = x2d if transform is None else transform.forward(x2d)
        # Fused, only the rounding is compiled: Inductor's CPU scatter-add (the group sums)
        # accumulates in a thread-dependent order, which would make the codes irreproducible.
        noise = self.noise(generator, x2d.device)
        codes, scale, bias = self.kernel(fused_affine)(y, noise, self.bits, "row", self.rounding)
        return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype, transform)

    def variance_bound(self, x: Tensor) -> Tensor:
        """``(D/4)·Σ_i Δ_i² ‖T⁻¹e_i‖²``, Δ_i the step of row i of ``T x`` (PAPER.md §4).

        That form needs independent zero-mean noise per element (stochastic rounding); for
        nearest rounding the bound is ``‖T⁻¹‖₂²·(D/4)·Σ_i Δ_i²``.
        """
        check_float(x, self.name)
        x2d = as_rows(x).to(compute_dtype(x))
        transform = build_block_householder(x2d)
        y = x2d if transform is None else transform.forward(x2d)
        low, high = group_minmax(y, "row")
        steps = ((high - low) / (2**self.bits - 1)).squeeze(1)
        if transform is None:
            norms = torch.ones_like(steps)
        elif self.rounding == "stochastic":
            norms = transform.inverse_column_norms_sq()
        else:
            # Nearest rounding errs deterministically, so the rows' errors do not cancel in
            # expectation: bound ‖T⁻¹e‖² by ‖T⁻¹‖₂²‖e‖², with ‖T⁻¹‖₂ = max 1/s (H is orthogonal).
            norms = transform.row_scale.reciprocal().square().amax().expand_as(steps)
        return (x2d.shape[1] * steps.square() * norms / 4).sum()
