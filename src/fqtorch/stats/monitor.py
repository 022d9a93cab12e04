"""A cheap in-training probe: the ratio of quantization to sampling variance per layer.

FQT behaves like QAT while quantization variance is small against sampling variance (docs/method.md
§3). Every K steps the training loop hands the current batch to :meth:`VarianceMonitor.measure`:
the quantization variance comes from ``samples`` backward passes of one forward; the sampling
variance of a size-N minibatch is estimated from ``m`` micro-batches of the same batch: with
micro-batch mean gradients ``ḡ_i`` of ``n_i`` samples and their weighted mean ``ḡ``,
``Σ_i n_i (ḡ_i − ḡ)² / ((m − 1)·N)``, unbiased for ``Var[ḡ]`` whether or not the ``n_i`` are
equal (``Var[micro-batch gradient] / m`` when they are). The micro-batches run their own forward
passes, so layers that look across the batch (BatchNorm in train mode) see micro-batch
statistics: the estimate is then that of the micro-batch model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .estimators import (
    Batch,
    GradientVariance,
    LossFn,
    _Forward,
    _Params,
    _restored_buffers,
    exact_backward,
    kept_random_streams,
)
from .estimators import quantization_variance as _quantization_variance

__all__ = ["VarianceMonitor", "VarianceRatio"]


@dataclass(frozen=True)
class VarianceRatio:
    """Quantization and (estimated) sampling variance per layer, and their ratio."""

    quantization: dict[str, float]
    sampling: dict[str, float]

    @property
    def ratio(self) -> dict[str, float]:
        """Per layer; 0 where there is no quantization noise (a layer without gradient: 0/0),
        inf where only the sampling variance is 0."""
        return {
            k: v / self.sampling[k] if self.sampling.get(k) else (float("inf") if v else 0.0)
            for k, v in self.quantization.items()
        }

    @property
    def total_ratio(self) -> float:
        s = sum(self.sampling.values())
        return sum(self.quantization.values()) / s if s else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_ratio": self.total_ratio,
            "ratio": self.ratio,
            "quantization": self.quantization,
            "sampling": self.sampling,
        }


class VarianceMonitor:
    """Measure quantization/sampling variance ratios on training batches (see module doc)."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, *, samples: int = 4, micro_batches: int = 4
    ) -> None:
        if micro_batches < 2:
            raise ValueError(f"micro_batches must be >= 2, got {micro_batches}")
        self.model, self.loss_fn = model, loss_fn
        self.samples, self.micro_batches = samples, micro_batches

    def _sampling(self, batch: Batch) -> dict[str, float]:
        inputs, targets = batch
        m = min(self.micro_batches, len(targets))
        params = _Params.of(self.model)
        chunks = list(zip(inputs.chunk(m), targets.chunk(m), strict=True))
        with _restored_buffers(self.model), exact_backward(self.model):
            grads = [_Forward(self.model, self.loss_fn, c, params).gradient() for c in chunks]
        stacked = torch.stack(grads)  # (chunks, entries), float64
        # chunk() splits 10 samples in 4 as 3, 3, 3, 1: each mean weighs by its size
        sizes = torch.tensor([len(y) for _, y in chunks], dtype=stacked.dtype)
        sizes = sizes.to(stacked.device)[:, None]
        total = float(sizes.sum())
        mean = (sizes * stacked).sum(0) / total
        spread = (sizes * (stacked - mean).square()).sum(0)
        per_entry = spread / ((len(grads) - 1) * total)
        layer_of = dict(zip(params.names, params.layers, strict=True))
        return GradientVariance(params.per_parameter(per_entry), layer_of).per_layer

    def measure(self, batch: Batch) -> VarianceRatio:
        """The ratios on ``batch``. The model's buffers, its random streams (dropout's, the FQT
        layers' rounding generators) and its mode are left as they were: training goes on as
        if nothing had been measured."""
        was_training = self.model.training
        with kept_random_streams(self.model, batch[0].device):
            quant = _quantization_variance(self.model, self.loss_fn, batch, self.samples)
            sampling = self._sampling(batch)
        self.model.train(was_training)
        return VarianceRatio(quant.per_layer, sampling)
