"""Text generation (evaluation/generation.py) is the model's own token stream plus stop sequences and
end-of-text: the same tokens as `model.generate`, greedy and sampled, cut where the brief says."""
from __future__ import annotations

import copy

import pytest
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.evaluation.generation import generate_batch
from adaptive_mamba.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(neox_tokenizer_dir) -> Tokenizer:
    return load_tokenizer(neox_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tokenizer) -> AdaptiveMambaForCausalLM:
    torch.manual_seed(0)
    return AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=tokenizer.vocab_size)).eval()


def test_texts_are_the_decoded_tokens_of_model_generate(model, tokenizer):
    prompt = tokenizer.encode("It is a truth universally acknowledged")
    ids = torch.tensor([prompt] * 3)
    greedy = model.generate(ids[:1], 12)[0, len(prompt):].tolist()
    assert generate_batch(model, tokenizer, prompt, 1, 12) == [tokenizer.decode(greedy)]
    sampled = model.generate(ids, 12, do_sample=True, temperature=0.9, top_p=0.95,
                             generator=torch.Generator().manual_seed(7))[:, len(prompt):]
    texts = generate_batch(model, tokenizer, prompt, 3, 12, temperature=0.9, top_p=0.95,
                           generator=torch.Generator().manual_seed(7))
    assert texts == [tokenizer.decode(row) for row in sampled.tolist()] and len(set(texts)) == 3


def test_each_row_stops_at_its_first_stop_sequence_or_end_of_text(model, tokenizer):
    prompt = tokenizer.encode("Emma Woodhouse, handsome, clever, and rich")
    tokens = model.generate(torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    full = tokenizer.decode(tokens)
    stop = full[len(tokenizer.decode(tokens[:3])):][:2]          # two characters from the 4th token on
    assert generate_batch(model, tokenizer, prompt, 1, 12, stops=[stop, "\x00never"]) == [full[:full.find(stop)]]

    eos_tokenizer = copy.copy(tokenizer)                          # the same tokenizer, its 5th token as end-of-text
    eos_tokenizer.eos_id = tokens[4]
    assert generate_batch(model, eos_tokenizer, prompt, 1, 12) == [tokenizer.decode(tokens[:tokens.index(tokens[4])])]
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(model, tokenizer, [], 1, 4)
