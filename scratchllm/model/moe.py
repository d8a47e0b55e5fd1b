"""A mixture-of-experts feed-forward layer, as in Qwen3's MoE models (Qwen3-30B-A3B).

Instead of one large MLP, a layer holds `n_experts` small gated MLPs and a linear `router` that scores
them for each token. Each token goes through only its `n_experts_per_tok` best-scored experts, and
their outputs are summed, weighted by the router's softmax probabilities (renormalized over the chosen
ones with `norm_topk_prob`). The layer has many parameters but each token uses few: Qwen3-30B-A3B
holds 30B parameters and computes with about 3B per token.

`forward_reference` is the definition, one token at a time; `forward` computes the same by running
each expert once over all the tokens routed to it (tests check that the two agree).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .parts import GatedFeedForward


class MoEFeedForward(nn.Module):
    """`n_experts` gated MLPs of width `hidden_dim`; each token uses the `n_experts_per_tok` the router
    scores highest."""

    def __init__(
        self,
        emb_dim: int,
        hidden_dim: int,
        n_experts: int,
        n_experts_per_tok: int,
        norm_topk_prob: bool = True,
        activation: str = "silu",
    ):
        super().__init__()
        if not 1 <= n_experts_per_tok <= n_experts:
            raise ValueError(f"n_experts_per_tok must be in [1, {n_experts}], got {n_experts_per_tok}")
        self.n_experts_per_tok = n_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(emb_dim, n_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedFeedForward(emb_dim, hidden_dim, activation) for _ in range(n_experts)
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens x (N, emb_dim): the chosen experts (N, k) and their weights (N, k), in x's type."""
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.n_experts_per_tok, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights.to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The definition, token by token: sum over the token's chosen experts of weight * expert(token)."""
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights = self.route(flat)
        out = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            for e, w in zip(chosen[n].tolist(), weights[n]):
                out[n] += w * self.experts[e](flat[n : n + 1])[0]
        return out.view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert runs once, over the tokens routed to it; results are added back in place."""
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights = self.route(flat)
        out = torch.zeros_like(flat)
        order = chosen.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        token_of = order // self.n_experts_per_tok
        weight_of = weights.flatten()[order]
        start = 0
        for e, count in enumerate(counts):
            # training: an expert no token chose still runs (on none), so it gets a zero gradient, not
            # none: processes that shard or average gradients (FSDP, DDP) then exchange the same tensors
            if count or (self.training and torch.is_grad_enabled()):
                tokens = token_of[start : start + count]
                y = self.experts[e](flat[tokens]) * weight_of[start : start + count, None]
                out.index_add_(0, tokens, y.to(out.dtype))
            start += count
        return out.view_as(x)


__all__ = ["MoEFeedForward"]
