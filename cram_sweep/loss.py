"""Cross-entropy and argmax over the vocabulary, a few rows of logits at a time.

`F.cross_entropy(logits.float(), ...)` on bf16 logits makes several passes over (rows, vocab) in memory:
an fp32 copy, fp32 log-probabilities, a dense fp32 gradient, its cast back to bf16. Here each chunk of
rows is upcast to fp32, reduced and, in the backward, turned into its gradient while it sits in cache, and
only the logits' own dtype is written. Same numbers as fp32 log-softmax, up to float rounding.
"""

from __future__ import annotations

import torch

# fp32 elements per chunk: 4 MiB on CPU (measured best at 16-64 rows of a 49152 vocabulary, against 1-504);
# on a GPU only memory bounds it. Constants, not config keys: results do not depend on them (test_loss shrinks
# them to run the chunked path), and the measured best is a property of the hardware, not of a sweep.
CHUNK_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_CHUNK_ELEMENTS = 1 << 27


def cross_entropy_and_argmax(logits: torch.Tensor, targets: torch.Tensor):
    """Per-row cross-entropy (fp32, differentiable) and argmax of `logits` (rows, vocab) against `targets` (rows,)."""
    rows = max(1, CHUNK_ELEMENTS.get(logits.device.type, DEFAULT_CHUNK_ELEMENTS) // logits.shape[-1])
    return _ChunkedCrossEntropy.apply(logits, targets, rows)


def _fp32(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.to(torch.float32, copy=True)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, rows):
        logsumexp = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        argmax = torch.empty(len(logits), dtype=torch.long, device=logits.device)
        for start in range(0, len(logits), rows):
            chunk = _fp32(logits[start : start + rows])
            top, index = chunk.max(dim=-1, keepdim=True)
            argmax[start : start + rows] = index.squeeze(1)
            logsumexp[start : start + rows] = chunk.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, logsumexp)
        ctx.rows = rows
        ctx.mark_non_differentiable(argmax)
        return logsumexp - target_logits, argmax

    @staticmethod
    def backward(ctx, grad_ce, _grad_argmax):
        logits, targets, logsumexp = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(logits)
        for start in range(0, len(logits), rows):
            end = start + rows
            softmax = _fp32(logits[start:end]).sub_(logsumexp[start:end, None]).exp_()
            softmax.scatter_add_(1, targets[start:end, None], softmax.new_full((len(softmax), 1), -1.0))
            grad[start:end] = softmax.mul_(grad_ce[start:end, None])
        return grad, None, None
