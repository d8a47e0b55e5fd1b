"""Muon: momentum whose step for each hidden weight matrix is orthogonalized (Keller Jordan, 2024).

AdamW scales every coordinate of the update on its own. Muon looks at a weight matrix's update as a
matrix: the momentum M = U S V^T is replaced by U V^T, the nearest semi-orthogonal matrix, so that
every direction the gradient points along moves the weights by the same amount instead of a few
dominant directions taking the whole step. U V^T is found without an SVD by five iterations of a
quintic Newton-Schulz polynomial, which pushes every singular value of the normalized matrix towards
~1 using only matrix products.

Muon is for the matrices inside the transformer blocks (attention and feed-forward). Embeddings,
the output head, biases and LayerNorm parameters stay on AdamW; both kinds live in this one optimizer
(parameter groups with `muon: True` or `False`), so that the trainer's learning-rate schedule,
checkpoints and exact resume see one optimizer. A Muon step is scaled by 0.2 sqrt(max(rows, cols))
("match RMS to AdamW", Liu et al. 2025, "Muon is Scalable for LLM Training"), so the same learning
rate and decoupled weight decay serve both kinds.

Why not `torch.optim.Muon`: it exists from torch 2.9 on (this package supports 2.4), and it always
runs Newton-Schulz in bfloat16, which CPUs without bf16 instructions emulate slowly (see
benchmarks/RESULTS.md). Here it runs in bf16 where the hardware does bf16 products fast (GPUs, CPUs
with AVX-512 BF16 or AMX) and in fp32 elsewhere. A test checks the two give the same steps.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# the quintic's coefficients: chosen so that small singular values grow as fast as possible while
# all of them end up in about [0.7, 1.2] after five steps (exactly 1 is not needed for the update)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: torch.Tensor, steps: int = 5, eps: float = 1e-7, gram: bool | None = None
) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, for a matrix or a batch of matrices (..., m, n), in g's
    dtype. X <- a X + (b A + c A^2) X with A = X X^T maps each singular value s to
    a s + b s^3 + c s^5 and keeps the singular vectors. `gram`: take the same steps on the Gram
    matrix (`_gram_steps`); None: where that is cheaper and its rounding harmless (fp32 or fp64
    matrices more than twice as wide as tall)."""
    x = g if g.dim() == 3 else g.reshape(-1, *g.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: A = X X^T is then the smaller square
        x = x.mT
    # spectral norm <= Frobenius norm <= 1: every singular value starts in [0, 1]
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if gram is None:
        gram = x.dtype in (torch.float32, torch.float64) and x.size(-1) > 2 * x.size(-2)
    x = _gram_steps(x, steps) if gram else _steps(x, steps)
    if tall:
        x = x.mT
    return x.reshape(g.shape)


def _steps(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic on X itself: 3 products per step, two of them m x n (m <= n): 5 (4 m^2 n + 2 m^3) flops."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        A = x @ x.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, B, x, beta=a)  # a X + B X
    return x


def _gram_steps(x: torch.Tensor, steps: int, restart: int = 2) -> torch.Tensor:
    """The same steps taken on the m x m Gram matrix R = X X^T ("Gram Newton-Schulz", Dao AI Lab, 2026).

    Each step is X <- Z X with Z = a I + b R + c R^2, a polynomial in R, so Z commutes with R and the next
    Gram matrix is Z R Z. The product Q of the Z's meets X only at the end (and at the restart): four
    m x n products in all instead of two per step (8 m^2 n + 32 m^3 flops for five steps instead of
    20 m^2 n + 10 m^3). Equal to `_steps` in exact arithmetic, but the Gram matrix squares the condition
    number, so rounding grows; applying Q to X and recomputing R from it after `restart` steps brings it
    back to `_steps`' level. Half precision would need more care, so bf16 keeps `_steps`."""
    a, b, c = NS_COEFFICIENTS
    if steps < 1:
        return x
    r = x @ x.mT
    q = None  # the product of the Z's since the start or the restart
    for k in range(steps):
        if k == restart and q is not None:
            x = q @ x
            r, q = x @ x.mT, None
        z = torch.baddbmm(r, r, r, beta=b, alpha=c)  # b R + c R^2
        z.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I
        q = z if q is None else z @ q
        if k < steps - 1:
            r = z @ r @ z
    return q @ x


def muon_scale(shape: torch.Size) -> float:
    """Step size multiplier for an orthogonalized update of this shape: its entries' RMS becomes 0.2,
    about what AdamW's updates have, so AdamW's learning rate and weight decay carry over."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups marked `muon: True` (2-D weight matrices), AdamW for the others.

    Muon groups: `momentum` (0.95), Nesterov momentum (`nesterov`), `ns_steps` Newton-Schulz steps;
    AdamW groups: `betas`, `eps`. Both: `lr`, decoupled `weight_decay`. Matrices of one shape (or its
    transpose) are orthogonalized together as one batch of matrix products, in `ns_dtype` (None: bf16
    where the device multiplies bf16 matrices fast, else fp32).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: torch.dtype | None = None,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=betas,
            eps=eps,
            muon=True,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError(
                    "Muon groups take weight matrices (2-D) only; put the rest in `muon: False` groups"
                )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        mu = group["momentum"]
        by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, bool]]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)  # buf = mu buf + (1 - mu) g
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf  # Nesterov: look one step ahead
            # a tall matrix joins the wide ones of its transposed shape: one batch of products for both
            tall = update.size(0) > update.size(1)
            by_shape[(update.mT.shape if tall else update.shape, update.dtype, update.device)].append(
                (p, update.mT if tall else update, tall)
            )
        for (shape, dtype, device), entries in by_shape.items():
            stacked = torch.stack([u for _, u, _ in entries]).to(self.ns_dtype or _fast_dtype(device, dtype))
            orth = newton_schulz(stacked, group["ns_steps"]).to(dtype)
            step_size = group["lr"] * muon_scale(shape)
            for (p, _, tall), o in zip(entries, orth):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o.mT if tall else o, alpha=-step_size)

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"].item()
            m, v = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # bias-corrected: m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))


def _fast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bf16 for the Newton-Schulz products where the hardware runs them fast, else `dtype`."""
    from ..device import cpu_supports_bf16

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return dtype


def muon_param_groups(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`Muon`'s parameter groups, made from AdamW's (`optim.param_groups`: weight decay on matrices,
    frozen parameters left out): the weights of the linear layers inside the transformer blocks
    (`model.trf_blocks`) move to a group of their own (`muon: True`, their weight decay kept); the
    rest (embeddings, output or classifier head, LoRA adapters, biases, LayerNorm) stays on AdamW."""
    blocks = getattr(model, "trf_blocks", None)
    if blocks is None:
        raise ValueError("Muon needs a GPT model: it orthogonalizes the matrices of `model.trf_blocks`")
    hidden = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear)}
    muon = [{**g, "params": [p for p in g["params"] if id(p) in hidden], "muon": True} for g in groups]
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden], "muon": False} for g in groups]
    return [g for g in muon + rest if g["params"]]


__all__ = ["NS_COEFFICIENTS", "Muon", "muon_param_groups", "muon_scale", "newton_schulz"]
