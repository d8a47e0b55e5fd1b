"""A decode step's small operations in fewer calls, on CPUs where scratchllm/native builds.

Past the weight products, a decode step is little arithmetic spread over many small eager operations
and module calls, each costing more to launch than to compute (benchmarks/RESULTS.md, "A decode step's
rest in single calls"). `PackedLinears.installed()` routes modules through these forwards:
`norm_forward` (an RMSNorm in one native call), `gelu_forward` (a tanh GELU, vectorized),
`attention_forward` (a new token's QK-norm, RoPE, cache write and attention in one), `quantized_forward`
(an int8 or int4 layer straight to its kernel), `block_forward` (a block without nn.Module's per-call
machinery and its identity layers), and `gpt_model_forward` and `transformer_model_forward` (all of a
model's blocks in one native call). Each takes the module's own forward wherever it does not compute the
same thing. `gpt_greedy_proposals` runs a GPT-2 draft's greedy proposals for speculative decoding, several
steps, in one native call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .. import native
from ..model import gpt, transformer
from ..model.attention import CausalSelfAttention, KVCache, SlotKVCache, causal_mask
from ..model.gqa import GroupedQueryAttention
from ..model.parts import ACTIVATIONS, GELU, GatedFeedForward, LayerNorm, RMSNorm
from ..model.quantize import Int4Linear, Int8Linear

#: Up to this many rows (a decode step's tokens, or its heads under QK-norm), RMSNorm takes native's kernel.
NATIVE_NORM_ROWS = 64


def fused_routes(
    model: nn.Module, native_linears: bool = False
) -> list[tuple[nn.Module, Callable[..., torch.Tensor]]]:
    """The modules of `model` that a decode step runs faster through this module's forwards, each with
    its forward: RMSNorms, tanh GELUs, int8/int4 layers, and, where no module has forward hooks (which
    they would skip: a block's parts, attention's QK-norms), attention layers and blocks, and the model
    itself where its linear layers take `native.few_rows_linear` for a step's rows (`native_linears`: the
    kernels `PackedLinears` picked): its layers then run in one call. Call `native.available()` first."""
    routes: list[tuple[nn.Module, Callable[..., torch.Tensor]]] = []
    hooked = has_hooks(model)
    windows = {  # the sliding window of each attention layer that has one
        id(m.att): model.cfg.sliding_window
        for m in model.modules()
        if type(m) is transformer.TransformerBlock and m.sliding
    }
    for m in model.modules():
        if type(m) is RMSNorm:
            routes.append((m, norm_forward(m)))
        elif type(m) is GELU and m.form == "tanh":
            routes.append((m, gelu_forward(m)))
        elif type(m) in (Int8Linear, Int4Linear) and m._native:
            routes.append((m, quantized_forward(m)))
        elif hooked:
            continue
        elif native_linears and (forward := gpt_model_forward(m) or transformer_model_forward(m)):
            routes.append((m, forward))
        elif type(m) in (GroupedQueryAttention, CausalSelfAttention):
            routes.append((m, attention_forward(m, windows.get(id(m), 0))))
        elif (forward := block_forward(m)) is not None:
            routes.append((m, forward))
    return routes


def has_hooks(model: nn.Module) -> bool:
    """Whether any module of `model` has forward hooks."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def quantized_forward(layer: Int8Linear | Int4Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """An int8 or int4 layer's forward straight to native's one-row kernel for a decode step's single
    row of bf16 (int4: and no bias; int8: or fp32) activations, the result as the layer's own; other
    inputs take the layer's forward."""
    default = type(layer).forward.__get__(layer)
    width = layer.in_features
    # the tensors are captured, not read off the layer per call: nn.Module's lookup of buffers is slow
    if isinstance(layer, Int8Linear):
        weight, scale, sums, bias = layer.qweight, layer.scale, layer._row_sums, layer.bias

        def int8(x: torch.Tensor) -> torch.Tensor:
            if x.numel() == width and x.dtype in _TYPES and x.is_contiguous():
                return native.int8_rows_linear(x, weight, scale, sums, bias)
            return default(x)

        return int8
    codes, step, zero, group = layer.qweight, layer.step, layer.zero, layer.group_size

    def int4(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == width and x.dtype == torch.bfloat16 and x.is_contiguous() and layer.bias is None:
            return native.int4_one_row_linear(x, codes, step, zero, group)
        return default(x)

    return int4


def norm_forward(norm: RMSNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """`norm`'s forward in one native call for a decode step's few rows (eager PyTorch spends about ten
    small operations on it); prompts and other inputs take the module's own forward."""
    weight, default = norm.weight, RMSNorm.forward.__get__(norm)

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if x.dtype == weight.dtype and x.dtype in _TYPES and x.is_contiguous() and rows <= NATIVE_NORM_ROWS:
            return native.rms_norm(x, weight, norm.eps, norm.unit_offset)
        return default(x)

    return forward


def gelu_forward(gelu: GELU) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tanh GELU's forward through native's vectorized one (`native.gpt_layers` takes the same), for
    contiguous fp32 or bf16 inputs that need no gradient; others take the module's own forward."""
    default = GELU.forward.__get__(gelu)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _TYPES and x.is_contiguous() and not (x.requires_grad and torch.is_grad_enabled()):
            return native.gelu_tanh(x)
        return default(x)

    return forward


def attention_forward(
    att: GroupedQueryAttention | CausalSelfAttention, window: int = 0
) -> Callable[..., torch.Tensor]:
    """`att`'s forward with a decode step's attention in one native call (`native.decode_attention`):
    up to `FUSED_ATTENTION_TOKENS` new tokens per row, on a plain cache keeping every position of this
    layer without left padding (no mask, or the plain causal one), or on a `SlotKVCache` (continuous
    batching: each row at its own length, its step mask unchanged). `window`: the layer's sliding window
    (0: none), whose cache may be a ring (then one token per row). Everything else (longer prompts, padded
    batches, a slot cache's sliding windows, static mode, training) takes the module's own forward."""
    gqa = isinstance(att, GroupedQueryAttention)
    default = type(att).forward.__get__(att)
    n_heads = att.n_heads
    n_kv = att.n_kv_groups if gqa else att.n_heads
    q_norm, k_norm = (att.q_norm, att.k_norm) if gqa else (None, None)
    scale = att.scale if gqa and att.scale is not None else att.head_dim**-0.5

    def fused(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask, kv_cache, layer):
        if not _fusable(att, x, rope, mask, kv_cache, layer, q_norm, window):
            return None
        qkv = att.qkv(x)
        if qkv.dtype != x.dtype:
            return None
        cos, sin = rope if rope is not None else (None, None)
        y = native.decode_attention(
            qkv,
            n_heads,
            n_kv,
            None if q_norm is None else q_norm.weight,
            None if k_norm is None else k_norm.weight,
            q_norm.eps if q_norm is not None else 0.0,
            q_norm.unit_offset if q_norm is not None else False,
            cos,
            sin,
            kv_cache.k[layer],
            kv_cache.v[layer],
            kv_cache.pos,
            scale,
            *(_slots(kv_cache) or (None, None)),
            window,
            kv_cache.windows[layer] > 0,
        )
        return att.out_proj(y)

    if gqa:

        def forward(x, rope, mask=None, kv_cache=None, layer=0):
            y = fused(x, rope, mask, kv_cache, layer)
            return default(x, rope, mask, kv_cache, layer) if y is None else y

    else:

        def forward(x, mask=None, kv_cache=None, layer=0):
            y = fused(x, None, mask, kv_cache, layer)
            return default(x, mask, kv_cache, layer) if y is None else y

    return forward


#: Up to this many new tokens per row (a decode step, a draft's tokens checked, a short prompt),
#: attention takes `native.decode_attention`.
FUSED_ATTENTION_TOKENS = 8


def _fusable(
    att: nn.Module, x: torch.Tensor, rope, mask, kv_cache, layer: int, norm: RMSNorm | None, window: int = 0
) -> bool:
    """Whether `native.decode_attention` computes this call as the module's forward would."""
    slotted = type(kv_cache) is SlotKVCache
    if not (type(kv_cache) is KVCache or slotted) or kv_cache.static:
        return False
    b, t = x.shape[:2]
    if not (1 <= t <= FUSED_ATTENTION_TOKENS and b >= 1) or x.dtype not in _TYPES:
        return False
    if (att.training and att.dropout) or (x.requires_grad and torch.is_grad_enabled()):
        return False  # dropout, or gradients: the kernel has neither
    if norm is not None and norm.weight.dtype != x.dtype:
        return False
    keys, values = kv_cache.k[layer], kv_cache.v[layer]
    if (
        keys.device.type != "cpu"
        or keys.dtype not in _TYPES
        or not (keys.is_contiguous() and values.is_contiguous())
    ):
        return False
    if rope is not None and rope[0].dtype != x.dtype:
        return False
    tables = t * keys.shape[3]  # the RoPE values of one row's new tokens
    if slotted:  # each row at its own length: its own step mask (not a sliding window's) says it all
        rope_ok = rope is None or rope[0].numel() in (tables, b * tables)
        return rope_ok and mask is kv_cache.mask and not window
    ring = kv_cache.windows[layer] > 0
    if ring and not (t == 1 and window == keys.shape[2]):
        return False
    if not ring and kv_cache.pos + t > keys.shape[2]:
        return False
    if rope is not None and rope[0].numel() != tables:
        return False
    if mask is None:  # the module's forward refuses several tokens on a filled cache without a mask
        return t == 1 or kv_cache.pos == 0
    return _expected_mask(mask, kv_cache.pos, t, window, ring)


_TYPES = (torch.float32, torch.bfloat16)
#: Up to this many rows, `few_rows_kernel` decides a linear layer's kernel (native's takes at most 8).
FEW_ROWS = 8
_masks_seen: list[
    tuple[torch.Tensor, tuple]
] = []  # masks found as expected (a step hands each to many layers)


def _expected_mask(mask: torch.Tensor, start: int, t: int, window: int, ring: bool) -> bool:
    """Whether `mask` is the one `step_inputs` and `window_mask` give `t` tokens after `start` with no
    padding: causal, within `window` (0: none); over a ring, every key it holds. That is what each new
    token sees in `native.decode_attention` too. Checked once per mask and layer kind."""
    key = (start, t, window, ring)
    if any(seen is mask and k == key for seen, k in _masks_seen):
        return True
    if ring:
        want = torch.ones(1, 1, 1, min(start, window - 1) + 1, dtype=torch.bool, device=mask.device)
    else:
        want = causal_mask(start, t, mask.device)[None, None]
        if window:
            queries = torch.arange(start, start + t, device=mask.device)[:, None]
            want = want & (torch.arange(start + t, device=mask.device)[None, :] > queries - window)
    if mask.dtype != torch.bool or mask.shape != want.shape or not torch.equal(mask, want):
        return False
    _masks_seen[:] = [*_masks_seen[-3:], (mask, key)]
    return True


def block_forward(block: nn.Module) -> Callable[..., torch.Tensor] | None:
    """A block's inference forward (`transformer.TransformerBlock`, `gpt.TransformerBlock`) calling its
    parts' forwards directly: the same arithmetic as the block's own forward in eval mode, without
    nn.Module's per-call machinery (about fifteen calls per block) and the identity layers (dropout
    when not training, Gemma's post-norms where absent). None for other blocks; in training mode the
    block's own forward runs. Forward hooks on its parts are not called: install it only on models
    without them."""
    if type(block) not in (transformer.TransformerBlock, gpt.TransformerBlock):
        return None
    default = type(block).forward.__get__(block)
    norm1, norm2, att = block.norm1, block.norm2, block.att
    if type(block) is transformer.TransformerBlock:
        ff = _mlp_forward(block.ff)
        post_att, post_ff = (_unless_identity(m) for m in (block.post_att_norm, block.post_ff_norm))

        def forward(x, rope, mask=None, kv_cache=None, layer=0):
            if block.training:
                return default(x, rope, mask, kv_cache, layer)
            x = x + post_att(att.forward(norm1.forward(x), rope, mask, kv_cache, layer))
            return x + post_ff(ff(norm2.forward(x)))

        return forward
    ff = _mlp_forward(block.ff)

    def gpt_forward(x, mask=None, kv_cache=None, layer=0):
        if block.training:
            return default(x, mask, kv_cache, layer)
        x = x + att.forward(norm1.forward(x), mask, kv_cache, layer)
        return x + ff(norm2.forward(x))

    return gpt_forward


def gpt_model_forward(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """`GPTModel`'s forward with a decode step's blocks in one native call (`native.gpt_layers`): the
    same arithmetic as the blocks' fused forwards (plain linear layers through `native.few_rows_linear`,
    so install it only where `PackedLinears` routes a step's rows there; int8 and int4 layers through
    their one-row kernels, for one row). What the fused attention does not take (see
    `attention_forward`), padding masks, more than `FEW_ROWS` rows of new tokens (of quantized layers,
    more than one), losses, training and gradients take the model's own forward (`_step_forward`). None
    for other models, and for blocks with other parts (LoRA layers, replaced modules)."""
    gpt2 = _GPTStack.of(model)
    if gpt2 is None:
        return None
    blocks, stack, first = gpt2.blocks, gpt2.stack, gpt2.blocks[0].att

    def layers(in_idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        x, mask = model.layer_inputs(in_idx, kv_cache)
        if not stack.takes(x, in_idx) or not _fusable(first, x, None, mask, kv_cache, 0, None):
            for i, block in enumerate(blocks):
                x = block(x, mask=mask, kv_cache=kv_cache, layer=i)
            return x
        return native.gpt_layers(x, *gpt2.layers_args(kv_cache), *_slots(kv_cache))

    return _step_forward(model, blocks, layers)


def gpt_greedy_proposals(
    model: nn.Module,
) -> Callable[[list[int], KVCache, int, float], list[int] | None] | None:
    """For a GPT-2 draft whose decode steps `gpt_model_forward` runs: `propose(ids, kv_cache, k,
    confidence)`, its greedy proposals in one native call (`native.gpt_greedy_proposals`): `ids` (the
    tokens its cache lacks) fed, then up to `k` tokens, each its most likely next one, stopping where
    that one's probability is below `confidence`; the same tokens and cache as the draft's steps through
    the model (speculative.py), without Python between them. The cache advances by what was fed. It returns
    None where a step would not take the native call (too many tokens, another cache, gradients), and
    the factory None for other models and for a quantized or replaced head."""
    gpt2 = _GPTStack.of(model)
    head, norm = model.out_head if gpt2 else None, model.final_norm if gpt2 else None
    if (
        gpt2 is None
        or gpt2.stack.quantized
        or type(head) is not nn.Linear
        or head.weight.dtype != gpt2.stack.dtype
        or type(norm) is not LayerNorm
        or model.tok_emb.weight.dtype != gpt2.stack.dtype
        or type(model.drop_emb) is not nn.Dropout
    ):
        return None

    def propose(ids: list[int], kv_cache: KVCache, k: int, confidence: float) -> list[int] | None:
        t, pos = len(ids), kv_cache.pos
        if type(kv_cache) is not KVCache or model.training or any(b.training for b in gpt2.blocks):
            return None
        room = min(model.cfg.context_length, kv_cache.k[0].shape[2])
        if not 1 <= t <= FEW_ROWS or pos + t + k - 1 > room or torch.is_grad_enabled():
            return None
        shape = torch.empty(1, t, 0, dtype=gpt2.stack.dtype)  # what `_fusable` reads of the embeddings
        mask = causal_mask(pos, t, shape.device)[None, None] if t > 1 and pos > 0 else None
        if not _fusable(gpt2.blocks[0].att, shape, None, mask, kv_cache, 0, None):
            return None
        idx = torch.tensor([ids], dtype=torch.long, device=kv_cache.k[0].device)
        embeddings = (model.tok_emb.weight, model.pos_emb.weight)
        proposals = native.gpt_greedy_proposals(
            idx, embeddings, gpt2.layers_args(kv_cache), (norm.scale, norm.shift, norm.eps),
            (head.weight, head.bias), k, confidence,
        ).tolist()  # fmt: skip
        kv_cache.advance(t + len(proposals) - (len(proposals) == k))
        return proposals

    return propose


class _GPTStack:
    """A `GPTModel`'s blocks as `native.gpt_layers` takes them (`of`: None where it cannot)."""

    def __init__(self, blocks: list[nn.Module], stack: _Stack, eps: float, gelu: str):
        self.blocks, self.stack, self.eps, self.gelu = blocks, stack, eps, gelu
        self.scale = blocks[0].att.head_dim ** -0.5

    @staticmethod
    def of(model: nn.Module) -> _GPTStack | None:
        """`model`'s stack, if it is a GPT-2 model of plain blocks whose layers a call takes."""
        if type(model) is not gpt.GPTModel or not model.trf_blocks:
            return None
        blocks = list(model.trf_blocks)
        if not all(_plain_gpt_block(b) for b in blocks):
            return None
        stack = _stack(
            blocks,
            lambda b: [b.norm1.scale, b.norm1.shift, b.norm2.scale, b.norm2.shift],
            lambda b: [b.att.qkv, b.att.out_proj, b.ff.layers[0], b.ff.layers[2]],
        )
        eps = {n.eps for b in blocks for n in (b.norm1, b.norm2)}
        gelu = {b.ff.layers[1]._approximate for b in blocks}
        if stack is None or len(eps) != 1 or len(gelu) != 1:
            return None
        return _GPTStack(blocks, stack, eps.pop(), gelu.pop())

    def layers_args(self, kv_cache: KVCache) -> tuple:
        """`native.gpt_layers`' arguments after x, up to its scale, for a step over `kv_cache`."""
        stack, att = self.stack, self.blocks[0].att
        return (
            stack.params, stack.kinds, stack.groups, kv_cache.k, kv_cache.v, kv_cache.pos,
            att.n_heads, self.eps, self.gelu, self.scale,
        )  # fmt: skip


def transformer_model_forward(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """`Transformer`'s forward (Llama 3, Qwen3, Gemma 3) with a decode step's blocks in one native call
    (`native.transformer_layers`), as `gpt_model_forward` does for GPT-2: the same arithmetic as the
    blocks' fused forwards, on the same conditions. None for mixtures of experts and for blocks with
    other parts."""
    if type(model) is not transformer.Transformer or not model.trf_blocks:
        return None
    blocks, cfg = list(model.trf_blocks), model.cfg
    if not all(_plain_transformer_block(b) for b in blocks):
        return None

    def weight(norm: nn.Module | None) -> torch.Tensor | None:
        return norm.weight if type(norm) is RMSNorm else None

    stack = _stack(
        blocks,
        lambda b: (
            [weight(m) for m in (b.norm1, b.att.q_norm, b.att.k_norm, b.post_att_norm)]
            + [weight(b.norm2), weight(b.post_ff_norm)]
        ),
        lambda b: [b.att.qkv, b.att.out_proj, b.ff.gate, b.ff.up, b.ff.down],
    )
    norms = {(m.eps, m.unit_offset) for b in blocks for m in b.modules() if type(m) is RMSNorm}
    acts = {b.ff.activation for b in blocks}
    scales = {b.att.scale for b in blocks}
    if stack is None or len(norms) != 1 or len(acts) != 1 or len(scales) != 1:
        return None
    ((eps, unit_offset),), (act,) = norms, acts
    first = blocks[0].att
    scale = first.scale if first.scale is not None else first.head_dim**-0.5
    kinds = [cfg.layer_type(i) for i in range(len(blocks))]
    windows = [cfg.sliding_window if kind == "sliding" else 0 for kind in kinds]

    def layers(in_idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        x, ropes, masks = model.layer_inputs(in_idx, kv_cache)
        rings = [0] * len(blocks) if type(kv_cache) is SlotKVCache else [int(w > 0) for w in kv_cache.windows]
        firsts = {(kind, ring): i for i, (kind, ring) in reversed(list(enumerate(zip(kinds, rings))))}
        if not stack.takes(x, in_idx) or not all(
            _fusable(blocks[i].att, x, ropes[k], masks[k], kv_cache, i, blocks[i].att.q_norm, windows[i])
            for (k, _), i in firsts.items()
        ):
            for i, block in enumerate(blocks):
                x = block(x, ropes[kinds[i]], mask=masks[kinds[i]], kv_cache=kv_cache, layer=i)
            return x
        tables = [*ropes["full" if "full" in ropes else "sliding"], *ropes.get("sliding", (None, None))]
        return native.transformer_layers(
            x, stack.params, stack.kinds, stack.groups, kv_cache.k, kv_cache.v, kv_cache.pos,
            first.n_heads, first.n_kv_groups, eps, unit_offset, scale, act, tables, windows, rings,
            *_slots(kv_cache),
        )  # fmt: skip

    return _step_forward(model, blocks, layers)


class _Stack:
    """A model's blocks as a layers call takes them: `params` (each block's norm tensors, then 4 per linear
    layer), the linear layers' `kinds` and int4 `groups` (native.LINEAR_KINDS), and the type of the
    activations the plain tensors need (`dtype`)."""

    def __init__(self, params: list, kinds: list[int], groups: list[int], dtype: torch.dtype):
        self.params, self.kinds, self.groups, self.dtype = params, kinds, groups, dtype
        self.quantized, self.int4 = any(kinds), 2 in kinds

    def takes(self, x: torch.Tensor, in_idx: torch.Tensor) -> bool:
        """Whether the call computes what the linear layers' routes compute for `x`: its type, and one
        row where a layer is int8 or int4 (their routes' kernels take one), bf16 for int4."""
        if x.dtype != self.dtype:
            return False
        return not self.quantized or (in_idx.numel() == 1 and (not self.int4 or x.dtype == torch.bfloat16))


def _stack(
    blocks: list[nn.Module],
    norms: Callable[[nn.Module], list[torch.Tensor | None]],
    linears: Callable[[nn.Module], list[nn.Module]],
) -> _Stack | None:
    """The blocks' `norms` tensors and `linears` layers for a layers call; None where a linear layer is
    one it does not take, or the plain tensors differ in type."""
    params: list[torch.Tensor | None] = []
    kinds: list[int] = []
    groups: list[int] = []
    plain: set[torch.dtype] = set()
    for block in blocks:
        tensors = norms(block)
        params += tensors
        plain |= {t.dtype for t in tensors if t is not None}
        for m in linears(block):
            if type(m) is nn.Linear:
                tensors, kind, group = [m.weight, m.bias, None, None], 0, 0
                plain |= {t.dtype for t in tensors if t is not None}
            elif type(m) is Int8Linear and m._native:
                tensors, kind, group = [m.qweight, m.scale, m._row_sums, m.bias], 1, 0
            elif type(m) is Int4Linear and m._native and m.bias is None:
                tensors, kind, group = [m.qweight, m.step, m.zero, None], 2, m.group_size
            else:
                return None
            params += tensors
            kinds.append(kind)
            groups.append(group)
    if len(plain) != 1 or not plain <= set(_TYPES):
        return None
    return _Stack(params, kinds, groups, plain.pop())


def _step_forward(
    model: nn.Module, blocks: list[nn.Module], layers: Callable[[torch.Tensor, KVCache], torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """A model's forward that runs a decode step's tokens through `layers(in_idx, kv_cache)` (the
    hidden states after the last block), and everything else through the model's own forward: losses,
    padding masks, more than `FEW_ROWS` rows of tokens, and training or gradients anywhere (dropout, or
    autograd through the blocks, which the native call has not)."""
    default = type(model).forward.__get__(model)

    def forward(in_idx, *, kv_cache=None, padding_mask=None, return_hidden=False, targets=None, **kwargs):
        if (
            kv_cache is None
            or padding_mask is not None
            or targets is not None
            or kwargs
            or in_idx.numel() > FEW_ROWS
            or torch.is_grad_enabled()
            or model.training
            or any(block.training for block in blocks)
        ):
            return default(
                in_idx, kv_cache=kv_cache, padding_mask=padding_mask, return_hidden=return_hidden,
                targets=targets, **kwargs,
            )  # fmt: skip
        x = layers(in_idx, kv_cache)
        kv_cache.advance(in_idx.shape[1])
        return model._outputs(x, return_hidden, None, -100)

    return forward


def _slots(kv_cache: KVCache) -> tuple[torch.Tensor, ...]:
    """A `SlotKVCache`'s positions of the step's tokens and its rows' slots (nothing for a plain cache)."""
    return (kv_cache._pos, kv_cache._rows.view(-1)) if type(kv_cache) is SlotKVCache else ()


def _plain_gpt_block(block: nn.Module) -> bool:
    """Whether `block` is model/gpt.py's block made of its own parts (what `native.gpt_layers` computes;
    `_stack` checks the linear layers)."""
    att, ff = block.att, block.ff
    return (
        type(block) is gpt.TransformerBlock
        and type(att) is CausalSelfAttention
        and type(ff) is gpt.FeedForward
        and len(ff.layers) == 3
        and type(ff.layers[1]) is GELU
        and all(type(n) is LayerNorm for n in (block.norm1, block.norm2))
        and att.head_dim * att.n_heads == att.d_out
    )


def _plain_transformer_block(block: nn.Module) -> bool:
    """Whether `block` is model/transformer.py's block with a gated MLP, made of its own parts (what
    `native.transformer_layers` computes; `_stack` checks the linear layers)."""
    att, ff = block.att, block.ff
    return (
        type(block) is transformer.TransformerBlock
        and type(att) is GroupedQueryAttention
        and type(ff) is GatedFeedForward
        and ff.activation in ACTIVATIONS
        and all(getattr(m, "bias", None) is None for m in (ff.gate, ff.up, ff.down))
        and type(block.norm1) is RMSNorm
        and type(block.norm2) is RMSNorm
        and all(type(n) in (RMSNorm, nn.Identity) for n in (block.post_att_norm, block.post_ff_norm))
        and (type(att.q_norm), type(att.k_norm)) in ((type(None),) * 2, (RMSNorm,) * 2)
    )


def _unless_identity(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # looked up at each call: the forward installed then (a norm's fused one) is the one to run
    return (lambda x: x) if type(module) is nn.Identity else (lambda x: module.forward(x))


def _mlp_forward(ff: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A feed-forward's forward with its layers' forwards called directly (each the one installed then)."""
    if type(ff) is GatedFeedForward:
        gate, up, down, act = ff.gate, ff.up, ff.down, ACTIVATIONS[ff.activation]
        return lambda x: down.forward(act(gate.forward(x)) * up.forward(x))
    if type(ff) is gpt.FeedForward and len(ff.layers) == 3:
        first, act, last = ff.layers
        return lambda x: last.forward(act.forward(first.forward(x)))
    return lambda x: ff.forward(x)
