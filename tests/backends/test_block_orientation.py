"""A block format's scales run along each backward GEMM's reduction inside real layers, not only
in the config (docs/method.md §12): ``grad_input = G @ W`` sees blocks along G's columns (a
convolution's channels), ``grad_weight = Gᵀ X`` blocks along G's rows (samples and positions).

Each layer is built so that a gradient *is* the quantized ``G`` (identity-like weights or one-hot
inputs), and the rows of ``G`` span 2^21 in magnitude: every value must then be an E2M1 value
times the power-of-two scale of its own block along the reduction (MXFP4's no-clip rule under
stochastic rounding). Blocks along the other axis give values off that grid."""

from __future__ import annotations

import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
OUT = 4
ROWS = 32  # one MXFP4 block along the weight gradient's reduction


def _on_block_grid(values: torch.Tensor, reference: torch.Tensor, dim: int) -> bool:
    """Whether ``values`` are E2M1 values times the scale of ``reference``'s amax along ``dim``
    (each line along ``dim`` is one block here)."""
    amax = reference.double().abs().amax(dim, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))
    ratio = (values.double() / scale).abs()
    return bool((ratio.unsqueeze(-1) - E2M1).abs().amin(-1).max() == 0)


def _grad_output(shape: tuple[int, ...], rows_dim: int) -> torch.Tensor:
    """Random signs and magnitudes, each row (along ``rows_dim``) ``2^(3·(i mod 8))`` larger."""
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    g = (torch.rand(shape, generator=gen) + 0.5) * signs
    rows = 2.0 ** (3 * (torch.arange(shape[rows_dim]) % 8))
    return g * rows.reshape([-1 if d == rows_dim else 1 for d in range(len(shape))])


def _fqt(layer: nn.Module) -> nn.Module:
    cfg = FQTConfig(grad_quantizer="mxfp4", seed=0)  # both backward GEMMs in MXFP4 (stochastic)
    return quantize_model(nn.Sequential(layer), cfg).train()


def test_linear_blocks_run_along_each_reduction():
    linear = nn.Linear(ROWS, OUT, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(OUT, ROWS))  # grad_input[:, :OUT] = Q(G)
    model = _fqt(linear)
    x = torch.eye(ROWS, requires_grad=True)  # grad_weight = Q(G)ᵀ
    g = _grad_output((ROWS, OUT), rows_dim=0)
    model(x).backward(g)
    grad_weight = model[0].weight.grad  # (OUT, ROWS): row j is G's column j, one block
    assert _on_block_grid(grad_weight.T, g, dim=0)
    assert not _on_block_grid(grad_weight.T, g, dim=1)  # the other axis's scales do not fit
    grad_input = x.grad[:, :OUT]  # blocks along G's columns: one per sample
    assert _on_block_grid(grad_input, g, dim=1)
    assert not _on_block_grid(grad_input, g, dim=0)


def test_conv_blocks_run_along_each_reduction():
    n, h, w = 2, 4, 4  # 32 positions: one block along the weight gradient's reduction
    conv = nn.Conv2d(ROWS, OUT, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(OUT, ROWS).reshape(OUT, ROWS, 1, 1))
    model = _fqt(conv)
    # one-hot: position p = (n, h, w) in row-major order feeds input channel p alone
    x = torch.eye(ROWS).reshape(n, h, w, ROWS).permute(0, 3, 1, 2).contiguous().requires_grad_()
    g = _grad_output((ROWS, OUT), rows_dim=0).reshape(n, h, w, OUT).permute(0, 3, 1, 2)
    model(x).backward(g)
    columns = g.permute(0, 2, 3, 1).reshape(ROWS, OUT)  # (positions, channels)
    grad_weight = model[0].weight.grad.reshape(OUT, ROWS).T  # Q(G) as (positions, channels)
    assert _on_block_grid(grad_weight, columns, dim=0)
    assert not _on_block_grid(grad_weight, columns, dim=1)
    grad_input = x.grad[:, :OUT].permute(0, 2, 3, 1).reshape(ROWS, OUT)  # blocks along channels
    assert _on_block_grid(grad_input, columns, dim=1)
    assert not _on_block_grid(grad_input, columns, dim=0)
