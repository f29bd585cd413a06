"""`cram-sweep decode`: greedy-decode a stored sample from its vectors and compare with the original."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import load_sweep_config
from ..engine.model import load_model, resolve_attention, truncated
from ..engine.runtime import attention_implementation, autocast
from ..engine.scores import leading_matches
from ..errors import UserError
from ..methods import method
from ..results.store import SweepDir, read_results
from ..sweep.grid import method_settings


@torch.no_grad()
def greedy_decode(model, memory: torch.Tensor, given: torch.Tensor, n_new: int, precision: str) -> torch.Tensor:
    """Greedy continuation of [memory, given tokens] for `n_new` tokens: (B, n_new) ids. `given`: (B, k) ids,
    the first text token (k = 1), or none (k = 0) where the vectors predict the first token.

    Every step runs the whole sequence, as the optimization's forward does, not a KV-cached increment:
    crammed vectors sit at narrow argmax margins, and under bf16 a cached forward's different rounding
    alone flipped tokens of SmolLM2 samples whose teacher-forced accuracy was 1.0.
    """
    embed = model.get_input_embeddings()
    tokens = given
    with autocast(model, precision):
        for _ in range(n_new):
            inputs = torch.cat([memory, embed(tokens)], dim=1)
            logits = model(inputs_embeds=inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
            tokens = torch.cat([tokens, logits.float().argmax(dim=-1)[:, None]], dim=1)
    return tokens[:, given.shape[1] :]


def select_row(table, args) -> dict:
    """The stored row chosen by --cell/--sample/--restart, or by --model/--dataset/--method/--length/--n-mem/--sample/--restart."""
    if table.empty:
        raise UserError("the sweep has no finished samples yet: see `cram-sweep status`")
    if args.cell:
        rows = table[table["cell"] == args.cell]
        if rows.empty:
            raise UserError(f"no finished sample in cell {args.cell!r}: cells with samples are {sorted(table['cell'].unique())}")
    else:
        rows = table
        picks = (("model", args.model), ("dataset", args.dataset), ("method", args.method), ("length", args.length), ("n_mem", args.n_mem))
        for column, value in picks:
            if value is not None:
                rows = rows[rows[column] == value]
        if rows.empty or rows["cell"].nunique() > 1:
            found = sorted(rows["cell"].unique() if not rows.empty else table["cell"].unique())
            raise UserError(
                f"--model/--dataset/--method/--length/--n-mem must pick one cell; they match {len(rows['cell'].unique())}: choose --cell from {found}"
            )
    match = rows[rows["sample"] == args.sample]
    if match.empty:
        raise UserError(
            f"no finished sample {args.sample} in cell {rows['cell'].iloc[0]}: finished samples are {sorted(set(rows['sample'].tolist()))}"
        )
    restart = match[match["restart"] == args.restart]
    if restart.empty:
        raise UserError(
            f"no finished restart {args.restart} of sample {args.sample} in cell {rows['cell'].iloc[0]}: "
            f"finished restarts are {sorted(match['restart'].tolist())}"
        )
    return restart.iloc[0].to_dict()


def stored_tensors(lm, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored row's token ids (L,) and vectors (1, n_mem, hidden) on the model's device."""
    ids = torch.tensor(row["token_ids"], device=lm.device)
    return ids, torch.tensor(row["memory"], dtype=torch.float32, device=lm.device).view(1, row["n_mem"], -1)


def decode_row(lm, row: dict, given: int, attention: str = "auto") -> tuple[list[int], int]:
    """The greedy tokens after the `given` ones (the method's: the prefix, else the first text token, else none with
    `predict_first`), and how many match the text before the first error: the stored `greedy_prefix`.

    Runs with the precision and attention implementation the sweep optimized with."""
    ids, memory = stored_tensors(lm, row)
    with attention_implementation(lm.model, resolve_attention(attention, lm.device, len(ids) + row["n_mem"])):
        decoded = greedy_decode(lm.model, memory, ids[None, :given], len(ids) - given, row["precision"])
    prefix = int(leading_matches(decoded == ids[None, given:])[0])
    return decoded[0].tolist(), prefix


def decode_command(args) -> int:
    sweep = SweepDir(args.sweep_dir).require()
    row = select_row(read_results(sweep).to_pandas(), args)
    cfg = load_sweep_config(sweep.config)
    lm = load_model(row["model"], cfg.models[row["model"]], cfg.device, row["precision"])
    lm = replace(lm, model=truncated(lm.model, row["layers"]))
    settings = method_settings(cfg)[row["method"]].method
    given = settings.given
    decoded, prefix = method(row["method"]).decode(lm, row, given, cfg.attention)
    ids, tok = list(row["token_ids"]), lm.tokenizer
    reproduced = given + prefix  # text tokens reproduced, the given one included
    restart = f" restart {row['restart']}" if row["restart"] else ""
    print(f"cell {row['cell']} sample {row['sample']}{restart} ({row['method']}): acc {row['acc']:.4f}, precision {row['precision']}")
    print("--- original ---")
    print(tok.decode(ids))
    print("--- decoded from the vectors (first differing token in [[ ]]) ---")
    if reproduced == len(ids):
        print(tok.decode(ids[:given] + decoded))
    else:
        print(tok.decode(ids[:reproduced]) + "[[" + tok.decode(decoded[prefix : prefix + 1]) + "]]" + tok.decode(decoded[prefix + 1 :]))
        print(f"--- expected at the first difference: {tok.decode(ids[reproduced : reproduced + 1])!r}")
    print(
        f"matched prefix: {prefix} of {len(ids) - given} predicted tokens; exact match: {'yes' if reproduced == len(ids) else 'no'}"
        f" (stored: greedy_prefix {row['greedy_prefix']}, greedy_exact {row['greedy_exact']})"
    )
    closing = method(row["method"]).decode_line(row, reproduced, settings.counted_from)
    if closing:
        print(closing)
    return 0
