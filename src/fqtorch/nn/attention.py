"""FQT ``nn.MultiheadAttention``: its projections, and optionally its attention products, as FQT
GEMMs.

``FQTMultiheadAttention`` adopts an ``nn.MultiheadAttention`` (the same Parameters, so
``state_dict()`` is unchanged) and runs what ``F.multi_head_attention_forward`` runs, step for step,
with these GEMMs under the layer's plan:

- the input projections: the packed ``in_proj_weight`` as one GEMM for self-attention, two for
  ``key is value``, three otherwise (as torch splits them), or the separate ``q/k/v_proj_weight``
  of a layer with ``kdim``/``vdim``; each GEMM quantizes the weight (slice) it multiplies;
- the output projection: ``out_proj`` becomes an ``FQTLinear`` of its own (``<name>.out_proj``,
  the same config, its own generator);
- with ``FQTConfig(attention_products=True)``, the score and value products of every head,
  ``S = (Q/√d)·Kᵀ`` and ``O = A·V``, as batched FQT GEMMs (:func:`fqt_bmm`): ``Q`` and ``A`` take
  the input quantizer, ``K`` and ``V`` the weight quantizer, and the gradients the gradient
  quantizers, with the algebra of a Linear layer's three GEMMs (docs/method.md §2), so the FQT
  gradient stays an unbiased estimate of the QAT gradient. Otherwise the products run in float,
  exactly as torch runs them (``scaled_dot_product_attention`` when no weights are returned).

With identity quantizers (``FQTConfig.preset("exact")``) the outputs and gradients equal
``nn.MultiheadAttention``'s; with ``attention_products=True`` they agree to float rounding (the
explicit softmax path replaces ``scaled_dot_product_attention``).

**Fully masked queries** (a fully padded sample; left padding with a causal mask), NaN policy:
a NaN turns its whole quantization group into NaN. With ``attention_products=True`` a query that
may attend to no key gets attention weights 0 (a safe softmax, as ``scaled_dot_product_attention``
gives), so its output is ``out_proj``'s bias and the other samples are untouched; the returned
weights of such rows are 0 where torch returns NaN. With the products in float, the layer gives
what torch gives: 0 rows without weights (``need_weights=False``), but with
``need_weights=True`` torch's softmax gives NaN rows, and ``out_proj``'s quantizer, whose scale
spans the whole tensor under a per-tensor quantizer, turns the whole output NaN (torch: those
rows only). Pass ``need_weights=False`` (as ``nn.TransformerEncoderLayer`` does) or turn the
products on when a batch may hold fully masked queries.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import auto
from ..config import FQTConfig
from ..quantizers.callers import FQTWarning, user_stacklevel
from .functional import PlanSource, fqt_gemm, fqt_linear
from .modules import FQTLinear, FQTModule

__all__ = ["BatchedMatmulOps", "FQTMultiheadAttention", "fqt_bmm"]


@dataclass(frozen=True)
class BatchedMatmulOps:
    """The three GEMMs of ``output[b] = input[b] @ weight[b]ᵀ``: ``input`` (B, M, K), ``weight``
    (B, N, K), output flattened to (B·M, N).

    Flat rows give the activation-gradient quantizer one row per (b, m), whose scale factors out
    of ``grad_input[b] = G[b] @ weight[b]`` (a sum over N); the weight-gradient quantizer sees
    ``G`` as (M, B·N) columns, whose scales factor out of ``grad_weight[b] = G[b]ᵀ @ input[b]``
    (a sum over M).
    """

    batch: int
    rows: int

    def _split(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(self.batch, self.rows, -1)  # (B, M, N)

    def prepare(self, input: Tensor) -> Tensor:
        return input

    def output(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        output = torch.bmm(input, weight.transpose(1, 2))
        if bias is not None:
            output = output + bias
        return output.reshape(-1, output.shape[-1])

    def grad_input(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return torch.bmm(self._split(grad_output), weight)

    def grad_weight(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return torch.bmm(self._split(grad_output).transpose(1, 2), input)

    def grad_bias(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return self._split(grad_output).sum(1)

    def grad_weight_and_bias(
        self, grad_output: Tensor, input: Tensor, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        weight_grad = self.grad_weight(grad_output, input, weight)
        return weight_grad, self.grad_bias(grad_output, input, weight)

    def columns(self, grad_output: Tensor) -> Tensor:
        return self._split(grad_output).transpose(0, 1).reshape(self.rows, -1)  # (M, B·N)

    def uncolumns(self, columns: Tensor, like: Tensor) -> Tensor:
        return columns.reshape(self.rows, self.batch, -1).transpose(0, 1).reshape(like.shape)

    def __repr__(self) -> str:
        return "batched matmul"


def fqt_bmm(input: Tensor, weight: Tensor, source: PlanSource, name: str = "") -> Tensor:
    """``input @ weight.transpose(1, 2)`` for ``input`` (B, M, K) and ``weight`` (B, N, K) as an
    FQT GEMM under ``source.plan`` (simulate backend): ``input`` takes the input quantizer,
    ``weight`` the weight quantizer, the gradients the gradient quantizers."""
    batch, rows, _ = input.shape
    if input.is_meta or input.numel() == 0:  # no values to quantize (shape inference)
        return torch.bmm(input, weight.transpose(1, 2)).to(input.dtype)
    output = fqt_gemm(input, weight, None, BatchedMatmulOps(batch, rows), source, name)
    return output.reshape(batch, rows, weight.shape[1])


def _causal_mask(tgt_len: int, src_len: int, like: Tensor) -> Tensor:
    """The additive mask ``scaled_dot_product_attention(..., is_causal=True)`` applies: query
    ``i`` sees keys ``0..i`` (top-left aligned; extra key columns stay masked)."""
    allowed = torch.ones(tgt_len, src_len, dtype=torch.bool, device=like.device).tril()
    mask = torch.zeros(tgt_len, src_len, dtype=like.dtype, device=like.device)
    return mask.masked_fill(~allowed, float("-inf")).unsqueeze(0)


def _safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim, with 0 (and a 0 gradient) for rows that are all ``-inf`` (a
    query that may attend to nothing), where ``F.softmax`` gives NaN; as
    ``scaled_dot_product_attention`` does. The products path needs it: its per-tensor input
    quantizer would turn one NaN row into a NaN batch."""
    masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = F.softmax(scores.masked_fill(masked, 0.0), dim=-1)
    return weights.masked_fill(masked, 0.0)


class FQTMultiheadAttention(FQTModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with FQT GEMMs (see the module docstring); also an
    ``nn.MultiheadAttention``, with the same forward signature and results."""

    def __init__(self, source: nn.MultiheadAttention, config: FQTConfig, name: str = "") -> None:
        super().__init__(config, name)
        self.adopt(source, nn.MultiheadAttention)
        if not isinstance(self.out_proj, FQTModule):
            out_name = f"{name}.out_proj" if name else "out_proj"
            self.out_proj = FQTLinear(self.out_proj, config, name=out_name)
        self._say_products_backend()

    @FQTModule.config.setter  # type: ignore[attr-defined]
    def config(self, config: FQTConfig) -> None:
        """As :attr:`FQTModule.config`, for ``out_proj`` too (built with this layer's config;
        give it its own afterwards with ``layer.out_proj.config = ...``)."""
        FQTModule.config.fset(self, config)  # type: ignore[attr-defined]
        out_proj = self._modules.get("out_proj")
        if isinstance(out_proj, FQTModule):  # not during __init__: it is built after
            out_proj.config = config
            self._say_products_backend()

    def _say_products_backend(self) -> None:
        """The products always run on simulate: say so wherever the projections do not, i.e.
        every other backend, and "auto" where it resolves to one on the weights' device (a
        model moved to another device later is judged where it was built)."""
        config = self.config
        backend = config.backend
        if backend == "auto":
            backend = auto.resolve(self.plan, self.out_proj.weight.device)
        if config.attention_products and backend != "simulate":
            warnings.warn(
                f"FQT layer {self.name!r}: the attention score and value products run on the "
                f"simulate backend (backend={config.backend!r} covers the projections only)",
                FQTWarning,
                stacklevel=user_stacklevel(),
            )

    def _linear(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return fqt_linear(input, weight, bias, self, name=self.name)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError(
                f"FQTMultiheadAttention {self.name!r} does not take nested tensors; pass padded "
                "tensors and a key_padding_mask"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"FQTMultiheadAttention {self.name!r} expects keys of {self.kdim} and values of "
                f"{self.vdim} features, got shapes {tuple(key.shape)} and {tuple(value.shape)}"
            )
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:  # transpose, keeping the "is" relations
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = self._attend(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        if self.batch_first and is_batched:
            output = output.transpose(1, 0)
        return output, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        """q, k, v: ``F._in_projection_packed`` / ``F._in_projection`` with FQT GEMMs."""
        embed = self.embed_dim
        bias = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
            return [
                self._linear(query, self.q_proj_weight, b_q),
                self._linear(key, self.k_proj_weight, b_k),
                self._linear(value, self.v_proj_weight, b_v),
            ]
        weight = self.in_proj_weight
        if key is value and query is key:  # self-attention: one GEMM
            proj = self._linear(query, weight, bias)
            proj = proj.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            return list(proj.contiguous())
        if key is value:  # encoder-decoder attention: q, and k and v together
            w_q, w_kv = weight.split([embed, 2 * embed])
            b_q, b_kv = (None, None) if bias is None else bias.split([embed, 2 * embed])
            q = self._linear(query, w_q, b_q)
            kv = self._linear(key, w_kv, b_kv)
            kv = kv.unflatten(-1, (2, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            return [q, *kv.contiguous()]
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        w_q, w_k, w_v = weight.chunk(3)
        return [
            self._linear(query, w_q, b_q),
            self._linear(key, w_k, b_k),
            self._linear(value, w_v, b_v),
        ]

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``F.multi_head_attention_forward`` on sequence-first inputs, step for step."""
        heads, head_dim = self.num_heads, self.head_dim
        products = self.config.attention_products
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(
                f"FQTMultiheadAttention {self.name!r} expects queries of {self.embed_dim} "
                f"features, got {embed_dim}"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch lets scaled_dot_product_attention apply the causal mask
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        q, k, v = self._in_projection(query, key, value)
        if attn_mask is not None:
            expected = (tgt_len, key.shape[0]) if attn_mask.dim() == 2 else None
            if attn_mask.dim() == 3:
                expected = (bsz * heads, tgt_len, key.shape[0])
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but "
                    f"should be {expected}."
                )
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise RuntimeError(
                    f"Expected key_padding_mask of shape {(bsz, src_len)}, got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if products and is_causal and attn_mask is None:  # the mask SDPA's is_causal applies
            attn_mask = _causal_mask(tgt_len, src_len, q)
        if need_weights or products:
            output, weights = self._explicit(q, k, v, attn_mask, dropout_p, products)
            output = output.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q = q.view(bsz, heads, tgt_len, head_dim)
            k = k.view(bsz, heads, src_len, head_dim)
            v = v.view(bsz, heads, src_len, head_dim)
            output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            output = output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            weights = None
        output = self.out_proj(output)
        output = output.view(tgt_len, bsz, output.size(1))
        if need_weights:
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            weights = None
        if not is_batched:
            output = output.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return output, weights

    def _explicit(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        dropout_p: float,
        products: bool,
    ) -> tuple[Tensor, Tensor]:
        """Scores, softmax, dropout and the value product on (B·heads, L, head_dim) tensors:
        FQT GEMMs when ``products``, else torch's float ``baddbmm``/``bmm``."""
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if products:
            scores = fqt_bmm(q_scaled, k, self, self.name)
            if attn_mask is not None:
                scores = scores + attn_mask
        elif attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = _safe_softmax(scores) if products else F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        if products:
            output = fqt_bmm(weights, v.transpose(1, 2), self, self.name)
        else:
            output = torch.bmm(weights, v)
        return output, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
            f"vdim={self.vdim}, batch_first={self.batch_first}, "
            f"attention_products={self.config.attention_products}, {self._plan_repr()}"
        )
