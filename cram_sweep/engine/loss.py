"""Cross-entropy and argmax over the vocabulary, from the last hidden states, a chunk at a time.

On a GPU the (rows, positions, vocab) logits are never materialized whole: each chunk's logits are the head's product
of its hidden states, upcast to fp32, reduced to a log-sum-exp, an argmax and the target's logit; the backward computes
them again, chunk by chunk, and turns them into the hidden states' gradient (a fused linear cross-entropy, as
Liger-Kernel's, with one more head product in the backward). Only the per-token loss and the argmax are kept. On a CPU,
where memory is plenty and the extra product costs 16 % (bf16) to 28 % (fp32) of a SmolLM2 step (L=64, batch 8), the
model's own head gives the logits and only the reduction is chunked, in cache.

Chunks are whole sample rows, or pieces of one row's positions where one row's logits exceed a chunk; every chunk of
a forward has the same shape (the rows per chunk divide the batch's rows), so a row's numbers do not depend on which
chunk, or slot, it falls in (layout.py). Models whose logits are more than a bias-free linear map (a logit scale or
soft-cap) give their logits, and only the reduction is chunked.
"""

from __future__ import annotations

from typing import Optional

import torch

# fp32 logits per chunk: 1 Mi on CPU (measured best at 16-64 rows of a 49152 vocabulary, against 1-504), 128 Mi
# (512 MB) on a GPU. Constants, not config keys: results do not depend on them beyond the rounding of another product
# shape (test_loss shrinks them to run several chunks), and the best value is the hardware's.
CHUNK_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_CHUNK_ELEMENTS = 1 << 27
FUSED_HEAD_DEVICES = {"cuda"}
# Families whose logits are exactly the head's product of the last hidden states (no logit scale or soft-cap, as
# Granite, Cohere and Gemma 2 apply): others give their logits from the model.
FUSED_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gpt_neox"}


def linear_head(model) -> Optional[torch.nn.Linear]:
    """The model's output head where the loss fuses it (on FUSED_HEAD_DEVICES, a family of FUSED_HEAD_FAMILIES, a
    bias-free linear head), else None: the model gives its logits."""
    head = model.get_output_embeddings()
    plain = isinstance(head, torch.nn.Linear) and head.bias is None and getattr(model.config, "model_type", "") in FUSED_HEAD_FAMILIES
    return head if plain and head.weight.device.type in FUSED_HEAD_DEVICES else None


def chunk_shape(rows: int, positions: int, vocab: int, device_type: str) -> tuple[int, int]:
    """(rows, positions) of every chunk: the most whole rows that divide `rows` and fit, or one row's positions in
    pieces of equal size (the last one shorter, for every row alike)."""
    budget = CHUNK_ELEMENTS.get(device_type, DEFAULT_CHUNK_ELEMENTS)
    if positions * vocab > budget:
        return 1, max(1, budget // vocab)
    fitting = max(1, budget // (positions * vocab))
    return max(d for d in range(1, min(rows, fitting) + 1) if rows % d == 0), positions


def cross_entropy_and_argmax(states: torch.Tensor, weight: Optional[torch.Tensor], targets: torch.Tensor):
    """Per-token cross-entropy (fp32, differentiable in `states`) and argmax (B, P) of the logits `states @ weight.T`
    (weight None: `states` are the logits) against `targets` (B, P). Under autocast the head's product runs in its
    dtype, as the model's own head would."""
    device_type = states.device.type
    if weight is None:  # the model's logits, reduced in their own dtype's fp32 upcast
        dtype = states.dtype
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    vocab = states.shape[-1] if weight is None else weight.shape[0]
    shape = chunk_shape(states.shape[0], states.shape[1], vocab, device_type)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(states, weight, targets, dtype, shape)


def _chunks(rows: int, positions: int, shape: tuple[int, int]):
    for row in range(0, rows, shape[0]):
        for position in range(0, positions, shape[1]):
            yield slice(row, row + shape[0]), slice(position, position + shape[1])


def _logits(states: torch.Tensor, weight: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """fp32 logits (n, V) of a chunk's states (r, p, H or V)."""
    flat = states.flatten(0, 1).to(dtype)
    logits = flat if weight is None else flat @ weight.to(dtype).T
    return logits.to(torch.float32, copy=True)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, weight, targets, dtype, shape):
        ce = torch.empty(targets.shape, dtype=torch.float32, device=states.device)
        argmax = torch.empty(targets.shape, dtype=torch.long, device=states.device)
        logsumexp = torch.empty_like(ce)
        for rows, positions in _chunks(*targets.shape, shape):
            logits = _logits(states[rows, positions], weight, dtype)
            chunk_targets = targets[rows, positions].flatten()
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            top, index = logits.max(dim=-1, keepdim=True)
            lse = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
            out_shape = targets[rows, positions].shape
            argmax[rows, positions] = index.view(out_shape)
            logsumexp[rows, positions] = lse.view(out_shape)
            ce[rows, positions] = (lse - target_logits).view(out_shape)
        ctx.save_for_backward(states, weight, targets, logsumexp)
        ctx.dtype, ctx.shape = dtype, shape
        ctx.mark_non_differentiable(argmax)
        return ce, argmax

    @staticmethod
    def backward(ctx, grad_ce, _grad_argmax):
        states, weight, targets, logsumexp = ctx.saved_tensors
        grad = torch.empty_like(states)
        for rows, positions in _chunks(*targets.shape, ctx.shape):
            softmax = _logits(states[rows, positions], weight, ctx.dtype).sub_(logsumexp[rows, positions].flatten()[:, None]).exp_()
            chunk_targets = targets[rows, positions].flatten()
            softmax[torch.arange(len(softmax), device=softmax.device), chunk_targets] -= 1.0  # no duplicates: deterministic
            softmax.mul_(grad_ce[rows, positions].flatten()[:, None])
            chunk_grad = softmax if weight is None else softmax.to(ctx.dtype) @ weight.to(ctx.dtype)
            grad[rows, positions] = chunk_grad.view(grad[rows, positions].shape)
        return grad, None, None, None, None
