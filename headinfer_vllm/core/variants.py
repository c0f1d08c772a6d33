"""Per-layer attention variants: sliding windows, logits soft-capping, attention sinks.

Each follows vLLM's semantics. For the query at absolute position ``p`` and
the keys ``j <= p`` of its sequence::

    s_j = scale * q . k_j
    s_j = cap * tanh(s_j / cap)                  soft-capping, before masking
    keep j only if p - window < j                sliding window (vLLM's FlashAttention:
                                                 window_size = (window - 1, 0))
    out = sum_j exp(s_j - m) v_j / (exp(sink_h - m) + sum_j exp(s_j - m))
                                                 sinks: a logit per query head h that joins
                                                 the denominator only; m = max(s_j, sink_h)
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True, eq=False)
class LayerAttention:
    """How one layer's attention departs from plain causal softmax attention; all off by default."""

    sliding_window: int | None = None
    """Tokens a query sees, itself included (vLLM's ``sliding_window``); None: the whole sequence."""
    logits_soft_cap: float | None = None
    """``cap`` of ``cap * tanh(score / cap)``; None: no capping (vLLM's 0 means None)."""
    sinks: torch.Tensor | None = None
    """shape: [num_query_heads], any float dtype, the attention device. One logit per query head
    (gpt-oss). Held by reference and read at every forward: weights loaded into it later count."""

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"headinfer: sliding_window must be at least 1 token, got {self.sliding_window}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"headinfer: logits_soft_cap must be positive (None: no cap), got {self.logits_soft_cap}")
        if self.sinks is not None and (self.sinks.dim() != 1 or not self.sinks.is_floating_point()):
            raise ValueError(
                f"headinfer: sinks must be a 1-D float tensor (one logit per query head), "
                f"got shape {tuple(self.sinks.shape)} of {self.sinks.dtype}"
            )

    def check(self, num_query_heads: int) -> None:
        """Refuse sinks that do not give one logit to each of ``num_query_heads`` heads."""
        if self.sinks is not None and self.sinks.shape[0] != num_query_heads:
            raise ValueError(
                f"headinfer: sinks hold {self.sinks.shape[0]} logits for {num_query_heads} query heads"
            )

    @property
    def is_masked_softmax(self) -> bool:
        """Neither capping nor sinks: a masked softmax, which torch's SDPA computes as is."""
        return self.logits_soft_cap is None and self.sinks is None


def soft_cap_(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(scores / cap)`` in place (nothing for None); returns ``scores``."""
    return scores if cap is None else scores.div_(cap).tanh_().mul_(cap)


def softmax_with_sinks_(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores [..., L]`` over the last dimension in place, ``sinks`` (broadcast to
    ``[..., 1]``, same dtype) joining the denominator only; returns ``scores``."""
    normalizer = torch.logaddexp(torch.logsumexp(scores, -1, keepdim=True), sinks)
    return scores.sub_(normalizer).exp_()
