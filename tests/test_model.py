"""The Mamba-1 model: numerical agreement with transformers' MambaForCausalLM, checkpoint formats, recurrent
cache, generation, loss and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.checkpoint_io import CheckpointError

HF_CONFIGS = {
    "dt_rank_auto": dict(vocab_size=1000, hidden_size=64, state_size=16, num_hidden_layers=2, time_step_rank="auto"),
    "dt_rank_12_bias": dict(vocab_size=512, hidden_size=48, state_size=8, num_hidden_layers=3, time_step_rank=12,
                            expand=2, conv_kernel=3, use_bias=True),
}


def hf_model(name: str, seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**HF_CONFIGS[name])).eval()
    with torch.no_grad():  # make every parameter non-trivial (HF inits some to 0/1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, AdaptiveMambaForCausalLM.from_pretrained(path).eval(), path


@pytest.mark.parametrize("length", [64, 1000])
def test_logits_match_transformers(hf_pair, length):
    hf, ours, _ = hf_pair
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


def test_loss_matches_transformers(hf_pair):
    hf, ours, _ = hf_pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels).loss
        out = ours(ids, labels=labels).loss
        chunked = ours(ids, labels=labels, return_logits=False).loss
    assert abs(out.item() - ref.item()) <= 1e-5
    assert abs(chunked.item() - out.item()) <= 1e-6


def to_state_spaces_dir(hf: MambaForCausalLM, path, vocab_size: int) -> None:
    """Write `hf`'s weights as a state-spaces mamba-ssm checkpoint (unpadded vocab_size in the config)."""
    state = {}
    for key, value in hf.state_dict().items():
        key = key.replace("backbone.embeddings.", "backbone.embedding.")
        state[key] = value.clone()
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps({
        "d_model": hf.config.hidden_size, "n_layer": hf.config.num_hidden_layers, "vocab_size": vocab_size,
        "ssm_cfg": {"d_state": hf.config.state_size, "d_conv": hf.config.conv_kernel},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
        "tie_embeddings": True}))


@pytest.mark.parametrize("length", [64, 1000])
def test_state_spaces_checkpoint_matches_transformers(tmp_path, length):
    hf = hf_model("dt_rank_auto", seed=3)   # vocab 1000 = 997 padded to a multiple of 8
    to_state_spaces_dir(hf, tmp_path / "ss", vocab_size=997)
    ours = AdaptiveMambaForCausalLM.from_pretrained(tmp_path / "ss").eval()
    assert ours.config.vocab_size == 997 and ours.config.padded_vocab_size == 1000
    ids = torch.randint(0, 997, (1, length), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_save_load_roundtrip_is_exact(tmp_path):
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=100)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again = AdaptiveMambaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight.data_ptr() == again.embedding.weight.data_ptr()  # still tied
    ids = torch.randint(0, 100, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_chunked_processing_with_cache_equals_one_pass():
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 90))
    with torch.no_grad():
        full = model(ids).logits
        cache, parts = None, []
        for s, e in [(0, 1), (1, 3), (3, 40), (40, 41), (41, 90)]:   # chunks shorter than the conv window too
            out = model(ids[:, s:e], cache=cache, use_cache=True)
            cache = out.cache
            parts.append(out.logits)
    assert cache.seen_tokens == 90
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_repeated_full_forward():
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=50)).eval()
    prompt = torch.randint(0, 50, (2, 11))
    out = model.generate(prompt, max_new_tokens=12)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            logits = model(ids).logits[:, -1, :50]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_generation_stops_at_eos_and_samples_reproducibly():
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=1, vocab_size=50)).eval()
    prompt = torch.randint(0, 50, (1, 5))
    greedy = model.generate(prompt, max_new_tokens=5)
    eos = int(greedy[0, 6])               # the 2nd generated token
    stopped = model.generate(prompt, max_new_tokens=5, eos_token_id=eos)
    assert stopped.shape[1] <= 7 and int(stopped[0, -1]) == eos
    a = model.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and int(a[:, 5:].max()) < 50


def test_loss_and_per_position_nll_are_one_computation():
    """lm_loss (training) and the per-position NLL (evaluation) both come from vocab_nll: chunking changes
    nothing, ignored labels count nowhere, and both equal a full-logits cross-entropy."""
    from adaptive_mamba.model import lm_loss, vocab_nll

    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=1, vocab_size=50))
    ids = torch.randint(0, 50, (2, 23))
    labels = ids.clone()
    labels[0, :4] = -100
    hidden = model.hidden_states(ids)
    reference = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1]).flatten(0, 1), labels[:, 1:].flatten())
    for chunk in (1, 5, 64):
        torch.testing.assert_close(lm_loss(model.lm_head, hidden, labels, chunk), reference, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            per = vocab_nll(model.lm_head, hidden[:, :-1], labels[:, 1:], chunk, per_position=True)
        assert per.shape == (2, 22) and per.dtype == torch.float32 and bool((per[0, :3] == 0).all())
        torch.testing.assert_close(per.sum() / (labels[:, 1:] != -100).sum(), reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="every label is -100"):
        lm_loss(model.lm_head, hidden, torch.full_like(labels, -100))


def test_parameter_counts_count_a_tied_weight_once():
    from adaptive_mamba.model import parameter_counts

    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=1, vocab_size=50))
    distinct = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert model.lm_head.weight is model.embedding.weight
    assert parameter_counts(model) == (sum(distinct.values()), sum(distinct.values()))
    model.embedding.weight.requires_grad_(False)
    assert parameter_counts(model) == (sum(distinct.values()) - model.embedding.weight.numel(), sum(distinct.values()))


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    cfg = AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=100)
    plain = AdaptiveMambaForCausalLM(cfg).train()
    ckpt = AdaptiveMambaForCausalLM(AdaptiveMambaConfig.from_dict({**cfg.to_dict(), "gradient_checkpointing": True}))
    ckpt.train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 100, (2, 33))
    for m in (plain, ckpt):
        m(ids, labels=ids).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_every_projection_is_called_as_a_module_on_every_path():
    """Masks and adapters wrap these modules: a forward hook must fire on training, chunked and step paths."""
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=1, vocab_size=50))
    mixer = model.blocks[0].mixer
    calls: list[str] = []
    for name in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj", "scan_input"):
        getattr(mixer, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    ids = torch.randint(0, 50, (1, 6))
    model(ids, labels=ids).loss.backward()                           # training path
    model.generate(ids, max_new_tokens=3)             # prompt pass + two one-token steps (the last token needs none)
    assert calls.count("in_proj") == 4 and set(calls) == {"in_proj", "conv1d", "x_proj", "dt_proj", "out_proj",
                                                          "scan_input"}
    assert all(calls.count(n) == 4 for n in ("conv1d", "x_proj", "dt_proj", "out_proj", "scan_input"))


# ------------------------------------------------------------------------------------------ bad input
def test_missing_and_mismatched_keys_are_listed(tmp_path, hf_pair):
    hf, _, path = hf_pair
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state.pop("backbone.layers.0.mixer.D")
    state["backbone.layers.1.mixer.A_log"] = torch.zeros(3, 3)
    state["backbone.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": hf.config.hidden_size, "n_layer": hf.config.num_hidden_layers, "vocab_size": hf.config.vocab_size,
        "ssm_cfg": {"d_state": hf.config.state_size, "d_conv": hf.config.conv_kernel, "expand": hf.config.expand,
                    "dt_rank": hf.config.time_step_rank, "bias": hf.config.use_bias}, "pad_vocab_size_multiple": 1}))
    with pytest.raises(CheckpointError) as err:
        AdaptiveMambaForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing (1): blocks.0.mixer.D" in msg
    assert "unexpected (1): backbone.extra.weight" in msg
    assert "blocks.1.mixer.A_log: checkpoint (3, 3)" in msg


def test_corrupt_and_missing_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        AdaptiveMambaForCausalLM.from_pretrained(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        AdaptiveMambaForCausalLM.from_pretrained(tmp_path / "empty")
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=16, n_layer=1, vocab_size=30))
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        AdaptiveMambaForCausalLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "adaptive_mamba", "d_modle": 16}')
    with pytest.raises(CheckpointError, match="did you mean 'd_model'"):
        AdaptiveMambaForCausalLM.from_pretrained(tmp_path / "m")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dt_rank"):
        AdaptiveMambaConfig(dt_rank="big")
    with pytest.raises(ValueError, match="unknown AdaptiveMambaConfig key"):
        AdaptiveMambaConfig.from_dict({"n_layers": 2})
