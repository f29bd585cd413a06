"""One-step generation (Mezentsev & Oseledets, EMNLP 2025): two trained vectors per text, e and m, fed as
[e, m, m, ..., m] (one e, then N-1 copies of m for an N-token text) and no text at all; the frozen model predicts
token i at position i, all N of them in ONE forward.

The forward sees no text, so its argmax is what decoding the vectors gives: teacher-forced and greedy accuracy are one
thing, and the greedy prefix is that forward's leading correct tokens. A sample ends and keeps its vectors as in full
cramming (accuracy 1.0, `patience`, `max_steps`; the best-accuracy forward's vectors), and the loss is the mean of the
N cross-entropies (the paper's sum, up to a factor AdamW does not see). Its capacity is full cramming's: the longest
length whose mean accuracy reaches FIT.

Columns (base.whole_text_columns, offset 0): `acc`, `greedy_prefix` and `horizon` count all N tokens from token 0;
`ce_bits` is the lowest summed CE of the N predictions; the no-vector baseline is the text's own from token 1, so
`info_gain_bits` counts token 0's CE with the vectors against nothing: a lower bound by that one token.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import FIT
from .full import Full, FullRule


def one_step_inputs(memory: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[e, m, ..., m] as long as the fed text (whose embeddings are not fed), every position predicting."""
    first, repeated = memory[:, :1], memory[:, 1:2]
    return torch.cat([first, repeated.expand(-1, text_embeds.shape[1] - 1, -1)], dim=1), 0


class OneStepRule(FullRule):
    feed = staticmethod(one_step_inputs)


class OneStep(Full):
    name = "onestep"
    feeds_text = False
    definition = (
        "One-step: the text from [e, m, ..., m] in one forward; max tokens as full cramming's (all N tokens predicted, "
        "token 0 included); info gain counts token 0 against no baseline.\n"
    )

    def check(self, method) -> Optional[str]:
        if method.prefix_tokens or not method.predict_first:
            return "method=onestep feeds no text: it takes neither method.prefix_tokens nor method.predict_first=false"
        return super().check(method)

    def check_grid(self, method, grid, key: str = "") -> Optional[str]:
        if list(grid.n_mem) != [2]:
            return f"grid.n_mem={list(grid.n_mem)}: method=onestep trains two vectors, e and m: set grid.n_mem=[2]"
        return None

    def rule(self, method, optim) -> OneStepRule:
        return OneStepRule(method, optim)

    def summary_line(self, name: str, r) -> str:
        fits = f"up to {r.max_tokens:.0f} tokens" if r.max_tokens else "no length of the grid (add shorter lengths or more steps)"
        return f"{name}: one-step generation fits {fits}: the longest length whose mean accuracy (one forward) is >= {FIT}"

    @torch.no_grad()
    def decode(self, lm, row: dict, given: int, attention: str = "auto") -> tuple[list[int], int]:
        """One forward of [e, m, ..., m]: its argmax at every position."""
        from ..engine.model import resolve_attention
        from ..engine.runtime import attention_implementation, autocast
        from ..engine.scores import leading_matches
        from ..report.decode import stored_tensors

        ids, memory = stored_tensors(lm, row)
        inputs, _ = one_step_inputs(memory, memory.new_zeros(1, len(ids), 1))
        with attention_implementation(lm.model, resolve_attention(attention, lm.device, len(ids))), autocast(lm.model, row["precision"]):
            decoded = lm.model(inputs_embeds=inputs, use_cache=False).logits[0].float().argmax(dim=-1)
        return decoded.tolist(), int(leading_matches((decoded == ids)[None])[0])


METHOD = OneStep()
