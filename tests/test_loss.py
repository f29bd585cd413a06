"""The chunked (fused linear) cross-entropy against F.cross_entropy on materialized fp32 logits, as the paper computes it,
and against the engine's rows before it existed."""

import pytest
import torch
import torch.nn.functional as F

from cram_sweep.engine import loss
from cram_sweep.engine.loss import chunk_shape, cross_entropy_and_argmax

ROWS, POSITIONS, HIDDEN, VOCAB = 6, 5, 16, 500


def _case(dtype):
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(ROWS, POSITIONS, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (ROWS, POSITIONS), generator=gen)
    grad_weights = torch.rand(ROWS, POSITIONS, generator=gen)
    return states, weight, targets, grad_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 2 * VOCAB, 3 * POSITIONS * VOCAB, 1 << 22])
@pytest.mark.parametrize("with_head", [True, False])
def test_chunked_cross_entropy_matches_fp32_log_softmax(dtype, chunk_elements, with_head, monkeypatch):
    """Whole rows or pieces of a row per chunk, the head's product fused or the logits given: F.cross_entropy's
    numbers, the argmax's first index on a tie, the states' gradient in their dtype, nothing modified in place."""
    monkeypatch.setitem(loss.CHUNK_ELEMENTS, "cpu", chunk_elements)
    states, weight, targets, grad_weights = _case(dtype)
    if not with_head:
        states, weight = (states.float() @ weight.float().T).to(dtype), None
        states[3, 1, 7] = states[3, 1, 11] = states[3, 1].max() + 1  # a tie: the first index wins, as in argmax

    reference_input = states.clone().requires_grad_()
    logits = reference_input if weight is None else reference_input @ weight.T
    reference = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(ROWS, POSITIONS)
    (reference * grad_weights).sum().backward()

    chunked_input = states.clone().requires_grad_()
    ce, argmax = cross_entropy_and_argmax(chunked_input, weight, targets)
    (ce * grad_weights).sum().backward()

    assert ce.dtype == torch.float32 and ce.shape == targets.shape
    torch.testing.assert_close(ce, reference.detach(), rtol=1e-5, atol=1e-4 if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(argmax, logits.detach().float().argmax(dim=-1))
    if not with_head:
        assert argmax[3, 1] == 7
    assert chunked_input.grad.dtype == dtype
    torch.testing.assert_close(chunked_input.grad, reference_input.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert torch.equal(states, chunked_input.detach())  # never modified in place


def test_under_autocast_the_head_runs_in_bf16_as_the_models_own():
    states, weight, targets, _ = _case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, _ = cross_entropy_and_argmax(states, weight, targets)
        logits = torch.nn.functional.linear(states, weight)
    assert logits.dtype == torch.bfloat16
    reference = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(ROWS, POSITIONS)
    torch.testing.assert_close(ce, reference, rtol=0, atol=1e-5)


def test_every_chunk_has_one_shape():
    """Whole rows dividing the batch, or one row in equal pieces: a row's numbers do not depend on its slot."""
    assert chunk_shape(6, 5, 500, "cuda") == (6, 5)
    assert chunk_shape(7, 64, 128, "cpu") == (7, 64)
    assert chunk_shape(12, 64, 49152, "cpu") == (1, 21) and chunk_shape(12, 64, 49152, "cuda") == (12, 64)
    assert chunk_shape(8, 1568, 128256, "cuda") == (1, 1046)  # the 8B shape: a row in two pieces
    for rows in range(1, 20):
        shape = chunk_shape(rows, 3, 1000, "cpu")
        assert rows % shape[0] == 0 and shape[0] * 3 * 1000 <= loss.CHUNK_ELEMENTS["cpu"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_head_gives_the_engines_rows_of_the_models_head(tiny_llama, precision, monkeypatch):
    """The GPU's path (the head fused into the loss) on this CPU: the rows of the model's own head, within the rounding
    of other product shapes."""
    from cram_sweep.engine.cram import cram

    from .helpers import assert_same_result, by_sample, specs_for, tiny_config

    optim = tiny_config().optim
    specs = specs_for(tiny_llama, 8, 3)
    unfused = by_sample(cram(tiny_llama.model, specs, 2, optim, precision, batch_size=3))
    monkeypatch.setattr(loss, "FUSED_HEAD_DEVICES", {"cpu"})
    assert loss.linear_head(tiny_llama.model) is tiny_llama.model.get_output_embeddings()
    fused = by_sample(cram(tiny_llama.model, specs, 2, optim, precision, batch_size=3))
    for sample, row in unfused.items():
        assert_same_result(fused[sample], row, atol=5e-2 if precision == "bf16" else 1e-3, steps_within=2 if precision == "bf16" else 0)
