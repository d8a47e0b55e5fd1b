"""The language-model loss, fused with the output head and computed in chunks of rows.

The plain way, `F.cross_entropy(out_head(x).float(), targets)`, materializes the logits of every
position: for GPT-2's 50,257-word vocabulary, a batch of 8 x 256 tokens makes a 412 MB fp32 tensor,
which is then read and written again by the softmax, its backward, the bf16/fp32 casts and the zero
fill of its gradient. On a CPU those passes over memory cost about a third of a training step.

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

# Logits per chunk. On a CPU, 128 rows x 50,257 fp32 values are 26 MB, about what its caches hold. On a
# GPU small chunks starve the matrix units and cost kernel launches: measured on an H200 (the issue-4
# training shape at batch 32, bf16), 128 rows ran at 207k tok/s, 2048 rows at 327k (peak memory 3.0 GB),
# one chunk of all 8192 rows at 337k (4.3 GB); benchmarks/RESULTS.md. Without gradients (evaluation)
# nothing full-size is kept, and the large chunks serve CPUs too: each chunk's matrix multiply re-packs the
# whole head weight, so on an AVX2 CPU in fp32 the head + loss of 8192 x 768 rows over GPT-2's vocabulary
# took 12.6 s in 128-row chunks, 8.9 s in 2048-row ones, 10.9 s as plain logits + cross-entropy.
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
        # (h.T @ G).T, not G.T @ h: the same numbers, and oneDNN runs this layout about 20% faster on CPU
        grad_w = (h.T @ grad_logits).T * g if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None
