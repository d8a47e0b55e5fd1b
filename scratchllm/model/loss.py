"""The language-model loss, fused with the output head and computed in chunks of rows.

The plain way, `F.cross_entropy(out_head(x).float(), targets)`, materializes the logits of every
position: for GPT-2's 50,257-word vocabulary, a batch of 8 x 256 tokens makes a 412 MB fp32 tensor,
which is then read and written again by the softmax, its backward, the bf16/fp32 casts and the zero
fill of its gradient. On a CPU those passes over memory are a large share of a training step.

`linear_cross_entropy` gives the same loss and gradients with one pass over the logits: for each
chunk of rows it computes the logits in the compute dtype, upcasts that chunk (small enough to stay
in cache) for the softmax, its log-sum-exp and the loss, and right away writes the gradient of the
logits, (softmax - onehot(target)) / count, into one (rows, vocab) tensor in the compute dtype (bf16
under autocast). That tensor is the only full-size one it keeps; the backward pass multiplies it into
the gradients of the hidden states and of the head's weight. The matrix multiplies are the same ones
autograd would run; what goes away is the fp32 logits, the separate softmax passes and their traffic.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantize import QuantizedLinear

# Logits per chunk: on a CPU with gradients, a chunk about the size of its caches (128 rows x 50,257 fp32
# values are 26 MB); on GPUs, and without gradients anywhere, larger chunks, since small ones starve the
# matrix units and each chunk re-packs the whole head weight (benchmarks/RESULTS.md, "On a GPU").
CHUNK_ELEMENTS = 128 * 50257
GPU_CHUNK_ELEMENTS = 2048 * 50257


def chunk_rows_for(device_type: str, vocab_size: int, grad: bool = True) -> int:
    """Rows of logits computed at a time on this kind of device (`grad`: for a training step)."""
    elements = CHUNK_ELEMENTS if device_type == "cpu" and grad else GPU_CHUNK_ELEMENTS
    return max(16, elements // vocab_size)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (the logits) against `targets`, as
    `F.cross_entropy(..., ignore_index=ignore_index)` computes it (softmax in fp32), with gradients
    for `hidden` and `weight`. `hidden`: (..., d); `weight`: (vocab, d); `targets`: (...) ids.
    Under autocast the matrix multiplies run in the autocast dtype, as `nn.Linear` would."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = chunk_rows or chunk_rows_for(device_type, weight.shape[0], grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index, rows
        )


def head_loss(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `targets`: fused by
    `linear_cross_entropy` in eager mode, the plain way under torch.compile (which fuses that
    better than it compiles the chunk loop) and for heads with a bias or LoRA adapters."""
    if type(head) is nn.Linear and head.bias is None and not torch.compiler.is_compiling():
        return linear_cross_entropy(hidden, head.weight, targets, ignore_index)
    if isinstance(head, QuantizedLinear) and head.bias is None:  # its weights, as its kernel sees x
        return linear_cross_entropy(head.kernel_input(hidden), head.weight_fp32(), targets, ignore_index)
    logits = head(hidden).flatten(0, 1).float()
    return F.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, rows: int):  # type: ignore[override]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != ignore_index
        count = valid.sum().to(torch.float32)  # like F.cross_entropy: 0/0 = nan when all are ignored
        safe_targets = torch.where(valid, targets, 0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # d loss / d logits = (softmax - onehot) / count (0 on ignored rows), kept in the compute dtype
        grad_logits = h.new_empty(h.shape[0], weight.shape[0]) if need_grad else None
        acc = torch.promote_types(h.dtype, torch.float32)
        for start in range(0, h.shape[0], rows):
            stop = min(start + rows, h.shape[0])
            tc, vc = safe_targets[start:stop, None], valid[start:stop]
            logits = (h[start:stop] @ weight.T).to(acc)
            target_logit = logits.gather(1, tc).squeeze(1)
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: the chunk's logits are not needed again
            norm = probs.sum(dim=-1, keepdim=True)
            lse = peak.squeeze(1) + norm.log().squeeze(1)
            total += (lse - target_logit).masked_fill(~vc, 0.0).sum()
            if need_grad:
                weight_row = vc.to(acc)[:, None] / count
                probs.mul_(weight_row / norm).scatter_add_(1, tc, -weight_row)
                grad_logits[start:stop] = probs
        ctx.save_for_backward(grad_logits, h, weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_logits, h, weight = ctx.saved_tensors
        g = grad_loss.to(h.dtype)
        grad_h = (grad_logits @ weight) * g if ctx.needs_input_grad[0] else None
        # (h.T @ G).T, not G.T @ h: the same numbers, in the layout oneDNN runs faster on CPUs
        grad_w = (h.T @ grad_logits).T * g if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None
