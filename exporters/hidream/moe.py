"""HiDream's mixture-of-experts feed-forward as a dense computation that exports.

``MOEFeedForwardSwiGLU.moe_infer`` sorts the tokens by expert and counts them with ``bincount().cpu().numpy()``
at run time: data-dependent Python that no ONNX exporter traces. The dense form computes every routed expert on
every token and weights each by its gate score where the gate picked it (top-k) and by zero elsewhere. The sum
is the same (an unpicked expert adds ``0 x out``), at the price of running all the experts (4 of 4 here, where
the sparse form runs 2 of 4).
"""

from __future__ import annotations

import contextlib


def dense_moe_forward(self, x):
    """``MOEFeedForwardSwiGLU.forward`` at inference, every expert computed: the gate's own top-k (scores,
    selection and the optional renormalisation as ``MoEGate.forward`` has them) as a (tokens, experts) weight
    matrix, zero where an expert was not picked."""
    import torch
    import torch.nn.functional as F

    gate = self.gate
    flat = x.reshape(-1, x.shape[-1])
    scores = F.linear(flat, gate.weight, None).softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=gate.top_k, dim=-1, sorted=False)
    if gate.top_k > 1 and gate.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    weights = torch.zeros_like(scores).scatter(1, topk_idx, topk_weight)
    y = torch.zeros_like(flat)
    for i, expert in enumerate(self.experts):  # in expert order, as moe_infer accumulates them
        y = y + expert(flat) * weights[:, i : i + 1]
    return y.view(x.shape) + self.shared_experts(x)


@contextlib.contextmanager
def dense_moe():
    """Every ``MOEFeedForwardSwiGLU`` runs the dense form while this is active (export and its reference)."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    original = MOEFeedForwardSwiGLU.forward
    MOEFeedForwardSwiGLU.forward = dense_moe_forward
    try:
        yield
    finally:
        MOEFeedForwardSwiGLU.forward = original
