"""The chunked cross-entropy against F.cross_entropy on fp32 logits, as the paper computes it."""

import pytest
import torch
import torch.nn.functional as F

from cram_sweep import loss
from cram_sweep.loss import cross_entropy_and_argmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 3 * 500, 1 << 20])
def test_chunked_cross_entropy_matches_fp32_log_softmax(dtype, chunk_elements, monkeypatch):
    monkeypatch.setitem(loss.CHUNK_ELEMENTS, "cpu", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 500, generator=gen) * 4).to(dtype)
    logits[3, 7] = logits[3, 11] = logits[3].max() + 1  # a tie: the first index wins, as in argmax
    targets = torch.randint(0, 500, (10,), generator=gen)
    weights = torch.rand(10, generator=gen)

    reference_input = logits.clone().requires_grad_()
    reference = F.cross_entropy(reference_input.float(), targets, reduction="none")
    (reference * weights).sum().backward()

    chunked_input = logits.clone().requires_grad_()
    ce, argmax = cross_entropy_and_argmax(chunked_input, targets)
    (ce * weights).sum().backward()

    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, reference.detach(), rtol=1e-6, atol=1e-5)
    assert torch.equal(argmax, reference_input.detach().float().argmax(dim=-1))
    assert argmax[3] == 7
    assert chunked_input.grad.dtype == dtype
    torch.testing.assert_close(chunked_input.grad, reference_input.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert torch.equal(logits, chunked_input.detach())  # the logits are never modified in place
