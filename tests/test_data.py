"""Texts as the tokenizer gives them: lengths in tokens, BOS counted where the tokenizer adds one."""

from .helpers import specs_for


def test_bos_counts_toward_length(tiny_llama, tiny_neox):
    llama_ids = specs_for(tiny_llama, 8, 1)[0].token_ids
    neox_ids = specs_for(tiny_neox, 8, 1)[0].token_ids
    assert len(llama_ids) == len(neox_ids) == 8
    assert llama_ids[0] == tiny_llama.tokenizer.bos_token_id
    assert neox_ids[0] != tiny_neox.tokenizer.bos_token_id
