"""The paper's loop, as `cram-sweep bench` compares the engine with it: one sample at a time, as the reference script."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.runtime import autocast


def paper_sample(model, token_ids: list[int], n_mem: int, steps: int, init_seed: int, precision: str, optim) -> None:
    """One sample as the reference script runs it: its own vector and AdamW, full logits, batch size 1."""
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(init_seed)
    memory = torch.nn.Parameter((torch.randn(n_mem, embed.weight.shape[1], generator=gen) * embed.weight.std().item()).to(device))
    opt = torch.optim.AdamW([memory], lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay)
    ids = torch.tensor(token_ids, device=device)[None]
    text = embed(ids)
    for _ in range(steps):
        with autocast(model, precision, cast_cache=False):
            logits = model(inputs_embeds=torch.cat([memory[None], text], 1)).logits[0, n_mem:-1]
        loss = F.cross_entropy(logits.float(), ids[0, 1:])
        # the reference reads each step's accuracy on the host to test convergence: one device sync per step
        (logits.argmax(-1) == ids[0, 1:]).float().mean().item()
        opt.zero_grad()
        loss.backward()
        opt.step()
