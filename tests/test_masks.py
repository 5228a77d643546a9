"""Pillar 2: learned masks. Forward semantics (relaxed in training, hard at evaluation), the gathered evaluation
path of structured masks, FLOPs counted from executed shapes, the regulariser, and training on real text."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.pillars import (CompactLinear, MaskConfig, MaskedLinear, apply_masks, compile_masks,
                                    expected_sparsity, load_adaptive_model, mask_regularizer, masked_modules,
                                    save_adaptive_model, set_temperature, sparsity_report, temperature_at)
from adaptive_mamba.pillars.masks import logistic_noise

ALL = ("in_proj", "x_proj", "dt_proj", "out_proj")


def tiny_model(n_layer: int = 2, vocab: int = 128, seed: int = 0) -> AdaptiveMambaForCausalLM:
    torch.manual_seed(seed)
    return AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=n_layer, vocab_size=vocab))


def randomize_logits(model: AdaptiveMambaForCausalLM, seed: int = 1) -> None:
    """Logits of both signs, so hard masks drop about half of the weights or blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.copy_(torch.randn(m.mask_logits.shape, generator=g))


def test_apply_masks_shares_weights_and_records_config() -> None:
    model = tiny_model()
    weight = model.blocks[0].mixer.in_proj.weight
    cfg = MaskConfig(kind="structured", block_size=8, targets=ALL)
    added = apply_masks(model, cfg)
    assert set(added) == {f"blocks.{i}.mixer.{p}" for i in range(2) for p in ALL}
    assert model.blocks[0].mixer.in_proj.weight is weight          # the same Parameter, not a copy
    assert model.blocks[0].mixer.in_proj.mask_logits.shape == (2 * 128 // 8,)     # output blocks (d_inner side)
    assert model.blocks[0].mixer.x_proj.mask_logits.shape == (128 // 8,)          # input blocks (d_inner side)
    assert model.config.extra["masks"] == cfg.to_dict()
    assert MaskConfig.from_dict(model.config.extra["masks"]) == cfg
    with pytest.raises(ValueError, match="already has masks"):
        apply_masks(model, cfg)


def test_bad_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="block_size 7 does not divide"):
        apply_masks(tiny_model(), MaskConfig(block_size=7))
    with pytest.raises(ValueError, match="targets"):
        MaskConfig(targets=("conv1d",))
    with pytest.raises(ValueError, match="schedule"):
        MaskConfig(schedule="step")
    with pytest.raises(ValueError, match="unknown MaskConfig key.*'tau_star' \\(did you mean 'tau_start'"):
        MaskConfig.from_dict({"tau_star": 1.0})


@pytest.mark.parametrize("kind,side", [("unstructured", None), ("structured", "out"), ("structured", "in")])
def test_eval_forward_is_the_hard_mask(kind: str, side: str) -> None:
    torch.manual_seed(0)
    layer = MaskedLinear(160, 32, True, kind, side, 4, 10)
    with torch.no_grad():     # exactly half of the logits positive, in random places
        n = layer.mask_logits.numel()
        signs = torch.where(torch.randperm(n) < n // 2, 1.0, -1.0)
        layer.mask_logits.copy_((signs * (torch.rand(n) + 0.1)).view_as(layer.mask_logits))
        layer.bias.normal_()
    layer.eval()
    x = torch.randn(3, 5, 160)
    hard = layer.expand(layer.hard_mask().float())
    expected = F.linear(x, layer.weight * hard, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(CompactLinear(layer)(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.realised_sparsity() == 0.5
    kept_fraction = 0.5
    if kind == "structured":   # gathered matmul: executed FLOPs fall with the kept fraction
        assert layer.gathers
        assert layer.executed_flops(10) == round(2 * 10 * 160 * 32 * kept_fraction)
        assert CompactLinear(layer).executed_flops(10) == layer.executed_flops(10)
        assert CompactLinear(layer).weight.numel() == round(160 * 32 * kept_fraction)
    else:                      # a masked dense matmul still costs dense FLOPs
        assert layer.executed_flops(10) == 2 * 10 * 160 * 32


def test_output_masks_of_narrow_layers_run_dense() -> None:
    """Below GATHER_MIN_FAN_IN inputs (dt_proj) the dense masked matmul runs, and the FLOPs say so."""
    torch.manual_seed(0)
    layer = MaskedLinear(48, 64, True, "structured", "out", 8, 10).eval()
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([1.0, -1.0] * 4))
    x = torch.randn(7, 48)
    assert not layer.gathers and layer.realised_sparsity() == 0.5
    assert layer.executed_flops(7) == 2 * 7 * 48 * 64
    expected = F.linear(x, layer.weight * layer.expand(layer.hard_mask().float()), layer.bias)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(CompactLinear(layer)(x), expected)


def test_training_forward_is_the_relaxed_mask_with_logistic_noise() -> None:
    torch.manual_seed(0)
    layer = MaskedLinear(16, 8, False, "structured", "out", 2, 10)
    layer.tau = 0.5
    x = torch.randn(4, 16)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    g = logistic_noise(layer.mask_logits.shape, layer.mask_logits)
    m = torch.sigmoid((layer.mask_logits + g) / 0.5)
    torch.testing.assert_close(y, F.linear(x, layer.weight * m.repeat_interleave(2)[:, None]))
    y.square().sum().backward()
    assert layer.mask_logits.grad is not None and layer.mask_logits.grad.abs().sum() > 0
    assert int(layer.history_count) == 1 and math.isclose(float(layer.mask_history[0]), float(m.detach().mean()), rel_tol=1e-6)


def test_logistic_noise_is_logistic() -> None:
    torch.manual_seed(0)
    g = logistic_noise(torch.Size([200_000]), torch.zeros(()))
    assert abs(float(g.mean())) < 0.02
    assert abs(float(g.var()) - math.pi ** 2 / 3) < 0.05        # variance of the standard logistic


def test_temperature_schedules() -> None:
    for schedule in ("linear", "exponential", "cosine"):
        cfg = MaskConfig(tau_start=2.0, tau_end=0.1, anneal_steps=100, schedule=schedule)
        taus = [temperature_at(s, cfg) for s in range(0, 121)]
        assert taus[0] == pytest.approx(2.0) and taus[100] == pytest.approx(0.1) and taus[120] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert temperature_at(50, MaskConfig(tau_start=1.0, tau_end=0.01, anneal_steps=100)) == pytest.approx(0.1)
    assert temperature_at(50, MaskConfig(schedule="constant", tau_start=0.7)) == 0.7
    model = tiny_model()
    apply_masks(model, MaskConfig())
    set_temperature(model, 0.25)
    assert {m.tau for m in masked_modules(model).values()} == {0.25}
    with pytest.raises(ValueError, match="> 0"):
        set_temperature(model, 0.0)


def test_regularizer_value_and_direction() -> None:
    """Value: the realised (hard) sparsity's distance to the target; gradient: through the expected sparsity."""
    model = tiny_model()
    cfg = MaskConfig(kind="unstructured", targets=("in_proj", "out_proj"), target_sparsity=0.6, sparsity_weight=2.0)
    apply_masks(model, cfg)
    mods = list(masked_modules(model).values())
    with torch.no_grad():
        for m in mods:
            m.mask_logits.normal_(0.5, 1.0)
    numel = sum(m.weight.numel() for m in mods)
    hard = 1 - sum(float((m.mask_logits > 0).sum()) for m in mods) / numel
    soft = 1 - sum(torch.sigmoid(m.mask_logits).sum() for m in mods) / numel
    assert 0.2 < hard < 0.5
    assert float(expected_sparsity(model).detach()) == pytest.approx(float(soft.detach()), rel=1e-5)
    reg = mask_regularizer(model, cfg)
    assert float(reg.detach()) == pytest.approx(2.0 * abs(hard - 0.6), rel=1e-5)
    reg.backward()
    assert all(bool((m.mask_logits.grad > 0).all()) for m in mods)   # sparsity below target: descent lowers logits
    torch.testing.assert_close(mods[0].mask_logits.grad, torch.autograd.grad(2.0 * (0.6 - soft), mods[0].mask_logits)[0])


def test_sparsity_report_counts_executed_shapes() -> None:
    model = tiny_model()
    apply_masks(model, MaskConfig(kind="structured", block_size=16, targets=ALL))
    with torch.no_grad():   # drop exactly half of the blocks of every projection
        for m in masked_modules(model).values():
            m.mask_logits.copy_(torch.tensor([1.0, -1.0]).repeat(m.mask_logits.numel() // 2))
    report = sparsity_report(model, tokens=7)
    assert report["sparsity"] == pytest.approx(0.5)
    for name, r in report["modules"].items():
        assert r["sparsity"] == pytest.approx(0.5)
        # dt_proj has 4 inputs (< GATHER_MIN_FAN_IN): its output mask runs as a dense masked matmul, the others gather half the channels
        assert r["executed_flops"] * (1 if name.endswith("dt_proj") else 2) == r["dense_flops"], name
    in_proj = report["modules"]["blocks.0.mixer.in_proj"]
    assert in_proj["dense_flops"] == 2 * 7 * 64 * 256
    dt = sum(r["dense_flops"] for n, r in report["modules"].items() if n.endswith("dt_proj"))
    assert report["executed_flops"] * 2 == report["dense_flops"] + dt


def test_structured_eval_model_matches_dense_masked_and_compiled_model() -> None:
    """At evaluation the gathered forward equals zeroing the masked weights, on the full and the recurrent path."""
    model = tiny_model()
    apply_masks(model, MaskConfig(kind="structured", block_size=8, targets=ALL))
    randomize_logits(model)
    model.eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        masked = model(ids).logits
        first = model(ids[:, :10], use_cache=True)
        step = model(ids[:, 10:11], cache=first.cache, use_cache=True).logits
        reference = tiny_model()                  # the same weights, masks applied by zeroing
        for name, m in masked_modules(model).items():
            reference.get_submodule(name).weight.copy_(m.weight * m.expand(m.hard_mask().float()))
        dense = reference(ids).logits
        names = list(masked_modules(model))
        compile_masks(model)
        assert all(isinstance(model.get_submodule(n), CompactLinear) for n in names)
        compiled = model(ids).logits
    torch.testing.assert_close(masked, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.logits, dense[:, :10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, dense[:, 10:11], rtol=1e-4, atol=1e-4)
    report = sparsity_report(model)
    assert report["executed_flops"] < report["dense_flops"]


def real_text_ids(shared_data, n_chars: int) -> tuple[torch.Tensor, int]:
    """Real text through the real GPT-NeoX tokenizer, ids compacted to the tokens that occur (small embedding)."""
    from adaptive_mamba.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_data / "tokenizers" / "gpt-neox-20b")
    text = (shared_data / "books" / "austen_pride_and_prejudice.txt").read_text()[:n_chars]
    vocab, ids = torch.unique(torch.tensor(tok.encode(text)), return_inverse=True)
    return ids, len(vocab)


@pytest.mark.slow
def test_training_on_real_text_reaches_target_sparsity(shared_data) -> None:
    ids, vocab = real_text_ids(shared_data, 60_000)
    model = tiny_model(vocab=vocab)
    cfg = MaskConfig(kind="structured", block_size=8, target_sparsity=0.5, anneal_steps=100, tau_end=0.05)
    apply_masks(model, cfg)
    logits = [p for n, p in model.named_parameters() if n.endswith("mask_logits")]
    weights = [p for n, p in model.named_parameters() if not n.endswith("mask_logits")]
    opt = torch.optim.AdamW([{"params": weights, "lr": 3e-3}, {"params": logits, "lr": 0.05, "weight_decay": 0.0}])
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(160):
        set_temperature(model, temperature_at(step, cfg))
        starts = torch.randint(0, ids.numel() - 65, (4,), generator=gen)
        batch = torch.stack([ids[s:s + 64] for s in starts])
        out = model(batch, labels=batch)
        loss = out.loss + mask_regularizer(model, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) / 20 < losses[0] - 1.0            # it learned something while sparsifying
    realised = sparsity_report(model)["sparsity"]
    assert abs(realised - cfg.target_sparsity) <= 0.05, realised


# ----------------------------------------------------------------------------------------------- channel masks
def channel_masked_model(seed: int = 1) -> AdaptiveMambaForCausalLM:
    model = tiny_model()
    apply_masks(model, MaskConfig(kind="channel"))
    randomize_logits(model, seed)
    return model


def zeroed_reference(model: AdaptiveMambaForCausalLM) -> AdaptiveMambaForCausalLM:
    """A plain model computing what the channel masks mean: each dropped channel's x_proj and out_proj columns
    zeroed (the channel then reaches nothing else), everything else unchanged."""
    reference = tiny_model()
    with torch.no_grad():
        for block, ref in zip(model.blocks, reference.blocks):
            drop = ~block.mixer.channel_mask.hard_mask()
            ref.mixer.x_proj.weight[:, drop] = 0.0
            ref.mixer.out_proj.weight[:, drop] = 0.0
    return reference.eval()


def test_channel_masks_one_logit_per_channel_and_weight_counts() -> None:
    model = channel_masked_model()
    masks = masked_modules(model)
    assert list(masks) == ["blocks.0.mixer.channel_mask", "blocks.1.mixer.channel_mask"]
    mask = masks["blocks.0.mixer.channel_mask"]
    assert mask.mask_logits.shape == (128,)
    mixer = model.blocks[0].mixer
    # in_proj 2*64, conv 4 + 1, x_proj dt_rank + 2N = 4 + 32, dt_proj 4 + 1, A_log 16, D 1, out_proj 64 per channel
    assert mask.weights_per_channel == 128 + 5 + 36 + 5 + 16 + 1 + 64
    assert mask.n_weights == sum(p.numel() for n, p in mixer.named_parameters() if "mask" not in n)
    hard = 1 - sum(float(m.hard_mask().sum()) for m in masks.values()) / 256
    assert sparsity_report(model)["sparsity"] == pytest.approx(hard)
    cfg = MaskConfig(kind="channel", target_sparsity=0.9, sparsity_weight=2.0)
    assert float(mask_regularizer(model, cfg).detach()) == pytest.approx(2.0 * abs(hard - 0.9), rel=1e-5)


def test_channel_mask_eval_gathers_and_equals_zeroed_columns(tmp_path) -> None:
    """Evaluation runs a mixer of the kept channels only; it equals the dense model with the dropped channels'
    x_proj / out_proj columns zeroed, on the full and the recurrent path, compiled, saved and reloaded."""
    model = channel_masked_model().eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.blocks[0].mixer.scan_input.register_forward_hook(lambda m, i, u: calls.append(u.shape))
    with torch.no_grad():
        gathered = model(ids).logits
        first = model(ids[:, :10], use_cache=True)
        step = model(ids[:, 10:11], cache=first.cache, use_cache=True).logits
        dense = zeroed_reference(model)(ids).logits
    handle.remove()
    assert len(calls) == 2          # the gathered forward did not run the full mixer; the recurrent path did
    torch.testing.assert_close(gathered, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.logits, dense[:, :10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, dense[:, 10:11], rtol=1e-4, atol=1e-4)
    kept = [int(b.mixer.channel_mask.hard_mask().sum()) for b in model.blocks]
    assert all(0 < k < 128 for k in kept)
    save_adaptive_model(model, tmp_path / "adaptive")         # masks saved and restored with the model
    with torch.no_grad():
        torch.testing.assert_close(load_adaptive_model(tmp_path / "adaptive").eval()(ids).logits, gathered)
    compile_masks(model)
    assert model.config.layer_d_inner == kept and [b.mixer.d_inner for b in model.blocks] == kept
    model.save_pretrained(tmp_path / "compact")
    loaded = AdaptiveMambaForCausalLM.from_pretrained(tmp_path / "compact").eval()
    assert loaded.blocks[1].mixer.conv1d.weight.shape[0] == kept[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_channel_mask_training_is_relaxed_and_a_layer_may_drop_every_channel() -> None:
    model = channel_masked_model()
    ids = torch.randint(0, 128, (2, 16))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(m.mask_logits.grad is not None and bool(m.mask_logits.grad.abs().sum() > 0)
               for m in masked_modules(model).values())
    with torch.no_grad():
        model.blocks[1].mixer.channel_mask.mask_logits.fill_(-1.0)      # layer 1 drops everything
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed_reference(model)(ids).logits, rtol=1e-5, atol=1e-5)
    assert sparsity_report(model)["modules"]["blocks.1.mixer"]["sparsity"] == 1.0


@pytest.mark.parametrize("granularity", ["structured", "unstructured", "channel"])
def test_trainer_regulariser_is_mask_regularizer(granularity: str) -> None:
    """The trainer's loss term is masks.mask_regularizer with the trainer's settings (one formula, one place)."""
    from adaptive_mamba.training.adaptation import PillarController
    from adaptive_mamba.training.config import load_train_config
    from adaptive_mamba.training.distributed import DistContext

    cfg = load_train_config(None, ["data.source=stdlib", f"masks.kind={granularity}", "masks.target_sparsity=0.7",
                                   "masks.sparsity_weight=0.3"])
    pillars = PillarController(cfg, DistContext(), total_steps=10)
    model = pillars.build_structure(tiny_model())
    randomize_logits(model)
    reg = pillars.regularizer(model.train())
    assert float(reg.detach()) == pytest.approx(float(mask_regularizer(model, pillars.mask_cfg).detach()))
    assert pillars.mask_cfg.sparsity_weight == 0.3 and pillars.mask_cfg.target_sparsity == 0.7
    reg.backward()
    assert all(m.mask_logits.grad is not None for m in masked_modules(model).values())


# ------------------------------------------------------------------------------------ channel-sparse training
def hard_pattern(model: AdaptiveMambaForCausalLM, pattern: str) -> None:
    """Channel logits for a pattern of hard channels (sigmoid(L) below the 0.01 threshold: exactly 0 in training,
    above 0.99: exactly 1) among relaxed ones. Odd counts throughout."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            logits = block.mixer.channel_mask.mask_logits
            logits.copy_(torch.randn(logits.shape, generator=g))               # relaxed (|L| < 4.6 here)
            order = torch.randperm(logits.numel(), generator=g)
            if pattern == "all_kept":
                logits[order[:33]] = 6.0                                        # 33 exactly 1, none 0
            elif pattern == "odd":
                logits[order[:37 + 54 * i]] = -6.0                              # 37 / 91 channels dropped
                logits[order[-9:]] = 6.0
            elif pattern == "layer_pruned":
                logits.fill_(-6.0 if i == 1 else 0.0)                           # layer 1 computes nothing
                logits[order[:51]] = -7.0 if i == 0 else -6.0
            elif pattern == "annealed":                                         # no threshold: a relaxed sample
                logits.mul_(6.0)                                                # at tau 0.05 underflows to 0


@pytest.mark.parametrize("pattern", ["all_kept", "odd", "layer_pruned", "annealed", "adapters", "checkpointed"])
def test_channel_sparse_training_equals_dense_masked(pattern: str, monkeypatch) -> None:
    """Training computes only the channels whose mask is not exactly 0 (the scan runs on fewer channels), and the
    loss and the gradient of every parameter (mask logits included) equal the dense masked forward's; dropped
    channels' parameters get exactly zero gradients. The scan-order statistics are the same on both paths; under
    activation checkpointing the recomputation draws the same noise, so it computes the same channels."""
    import adaptive_mamba.model as model_module
    from adaptive_mamba.pillars import ScanStatsCollector
    from test_scan_order import add_adapters

    model = tiny_model()
    threshold = 0.0 if pattern == "annealed" else 0.01
    apply_masks(model, MaskConfig(kind="channel", hard_threshold=threshold))
    hard_pattern(model, "odd" if pattern in ("adapters", "checkpointed") else pattern)
    model.config.gradient_checkpointing = pattern == "checkpointed"     # backward recomputes the same channels
    if pattern == "annealed":
        set_temperature(model, 0.05)
    if pattern == "adapters":         # wrapped projections are called as modules at full width
        add_adapters(model)
    model.train()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    widths: list[int] = []
    scan = model_module.selective_scan
    monkeypatch.setattr(model_module, "selective_scan",
                        lambda u, *a, **k: widths.append(u.shape[1]) or scan(u, *a, **k))

    def run(sparse: bool) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
        for block in model.blocks:
            block.mixer.channel_mask.sparse_training = sparse
        collector = ScanStatsCollector(model)
        collector.enable()
        torch.manual_seed(11)                  # the same logistic noise on both paths
        loss = model(ids, labels=ids).loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        collector.disable()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, \
            collector.state_tensors()

    dense_loss, dense_grads, dense_stats = run(False)
    assert widths[:2] == [128, 128]                  # (then the recomputation in backward, when checkpointed)
    widths.clear()
    sparse_loss, sparse_grads, sparse_stats = run(True)
    torch.manual_seed(11)
    masks = [b.mixer.channel_mask for b in model.blocks]
    samples = [torch.sigmoid((m.mask_logits + logistic_noise((128,), ids.float())) / m.tau) for m in masks]
    computed = [int(m.settle(sample).ne(0).sum()) for m, sample in zip(masks, samples)]
    expected = {"all_kept": [128, 128], "odd": [91, 37], "layer_pruned": [77, 0], "adapters": [91, 37],
                "checkpointed": [91, 37]}
    if pattern in expected:
        assert computed == expected[pattern]
    else:
        assert all(0 < c < 128 for c in computed), computed      # the annealed sample has exact zeros
    assert widths[:2] == [max(c, 1) for c in computed]           # a fully pruned layer runs one channel, times 0
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-5)
    assert sparse_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    for mine, ref in zip(sparse_stats, dense_stats):
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    if pattern == "odd":
        dropped = model.blocks[1].mixer.channel_mask.mask_logits.detach() < -4.6
        grad = sparse_grads["blocks.1.mixer.in_proj.weight"].view(2, 128, -1)
        assert bool((grad[:, dropped] == 0).all()) and bool((grad[:, ~dropped] != 0).any())
        assert bool((sparse_grads["blocks.1.mixer.channel_mask.mask_logits"][dropped] == 0).all())


@pytest.mark.parametrize("kind", ["unstructured", "structured", "channel"])
def test_masked_model_trains_and_evaluates_in_float64(kind: str) -> None:
    """Every mask kind works in the model's dtype: float64 logits, noise and history (a float32 history
    write used to fail under `model.double()`)."""
    model = tiny_model()
    apply_masks(model, MaskConfig(kind=kind, block_size=8, targets=ALL))
    randomize_logits(model)
    model.double()
    ids = torch.randint(0, 128, (2, 24))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(m.mask_logits.grad is not None for m in masked_modules(model).values())
    assert all(m.mask_history.dtype == torch.float64 and int(m.history_count) == 1
               for m in masked_modules(model).values())
    model.eval()
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.float64
