"""Pillar 3: sign-aware importance (gradient saliency, mask activation), pruned modules never adapted, the
allocation rule (the seed's worked example), peft LoRA / IA3 on every projection and every forward path, exact
merges under every mask kind, frozen weights, deterministic reallocation, trainable% and save/load."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.pillars import (AllocationDecision, HybridPeftConfig, MaskConfig, allocation_counts,
                                    apply_allocation, apply_masks, current_allocation, decide_allocation,
                                    format_allocation_table, load_adaptive_model, masked_modules, module_importance,
                                    save_adaptive_model, trainable_report)
from adaptive_mamba.pillars.common import base_layer, iter_projections
from adaptive_mamba.pillars.hybrid_peft import gradient_saliency, pruned_modules
from adaptive_mamba.pillars.masked_lora import MaskedLoraVariant
from adaptive_mamba.pillars.masks import MASK_KINDS

REPO = Path(__file__).resolve().parents[1]
ALL = ("in_proj", "x_proj", "dt_proj", "out_proj")


def masked_model(n_layer: int = 2, seed: int = 0, vocab: int = 128, kind: str = "structured") -> AdaptiveMambaForCausalLM:
    torch.manual_seed(seed)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=n_layer, vocab_size=vocab))
    apply_masks(model, MaskConfig(kind=kind, block_size=8, targets=ALL))
    return model


def batches(seed: int = 0, vocab: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    return [(ids, ids)]


def names(n_layer: int) -> list[str]:
    return [f"blocks.{i}.mixer.{p}" for i in range(n_layer) for p in ALL]


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Move adapters away from their identity initialisation (LoRA B = 0, IA3 = 1), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "ia3_l" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_seed_worked_example_4_layers_threshold_05_ratio_03() -> None:
    model = masked_model(n_layer=4)
    cfg = HybridPeftConfig(importance_threshold=0.5, application_ratio=0.3)
    assert list(module_importance(model, cfg, batches())) == names(4)
    importance = {n: 1.0 + k / 100 for k, n in enumerate(names(4))}     # known importance: module k gets 1 + k/100
    decision = decide_allocation(importance, cfg)
    assert decision.counts() == {"lora": 2, "ia3": 3, "frozen": 11}          # 16 modules: floor(5.3)=5, floor(2.9)=2
    assert decision.modules("lora") == ["blocks.3.mixer.dt_proj", "blocks.3.mixer.out_proj"]
    assert decision.modules("ia3") == ["blocks.2.mixer.out_proj", "blocks.3.mixer.in_proj", "blocks.3.mixer.x_proj"]
    table = format_allocation_table(decision).splitlines()
    assert table[0] == "blocks.0.mixer.in_proj: 1 -> frozen"
    assert table[15] == "blocks.3.mixer.out_proj: 1.15 -> LoRA"
    assert all(re.fullmatch(r"blocks\.\d+\.mixer\.\w+: [\d.]+ -> (LoRA|IA3|frozen)", line) for line in table[:16])
    assert table[16] == "allocation at step 0: 2 LoRA, 3 IA3, 11 frozen (of 16 modules)"


@pytest.mark.parametrize("n,ratio,threshold,expected", [
    (16, 0.3, 0.5, (2, 3)), (12, 0.3, 0.5, (2, 2)), (10, 0.3, 0.5, (2, 1)), (2, 0.25, 1.0, (1, 0)),
    (1, 0.3, 0.5, (0, 0)), (96, 0.3, 0.5, (14, 15)), (8, 1.0, 0.0, (0, 8)), (8, 0.0, 0.5, (0, 0))])
def test_rounding_rule(n: int, ratio: float, threshold: float, expected: tuple[int, int]) -> None:
    assert allocation_counts(n, HybridPeftConfig(application_ratio=ratio, importance_threshold=threshold)) \
        == expected


def test_ties_are_broken_by_name_and_decisions_serialise() -> None:
    importance = {n: 0.5 for n in reversed(names(2))}
    decision = decide_allocation(importance, HybridPeftConfig(application_ratio=0.5), step=3)
    assert decision.modules("lora") == ["blocks.0.mixer.dt_proj", "blocks.0.mixer.in_proj"]
    again = AllocationDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again == decision and again.step == 3
    with pytest.raises(ValueError, match="non-finite importance"):
        decide_allocation({"a": float("nan")}, HybridPeftConfig())


def test_importance_from_activations_and_clear_errors() -> None:
    model = masked_model()
    cfg = HybridPeftConfig(importance_source="activations", importance_window=3)
    with pytest.raises(ValueError, match="no training forward has been recorded"):
        module_importance(model, cfg)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(5):
        model(ids)
    imp = module_importance(model, cfg)
    m = model.blocks[1].mixer.x_proj
    assert int(m.history_count) == 5
    assert imp["blocks.1.mixer.x_proj"] == pytest.approx(float(m.mask_history[2:5].mean()))
    assert all(0.5 < v < 1.0 for v in imp.values())
    with pytest.raises(ValueError, match="raise MaskConfig.activation_window"):
        module_importance(model, HybridPeftConfig(importance_source="activations", importance_window=1000))
    torch.manual_seed(0)
    plain = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=2, vocab_size=128))
    with pytest.raises(ValueError, match="has no mask.*apply_masks"):
        module_importance(plain, cfg)
    with pytest.raises(ValueError, match="needs at least one batch"):
        module_importance(plain, HybridPeftConfig())
    with pytest.raises(ValueError, match=r"HybridPeftConfig.importance_source=.logits. is invalid: it must be one of"):
        HybridPeftConfig(importance_source="logits")


def test_saliency_is_mean_abs_weight_times_grad_and_zero_when_pruned() -> None:
    model = masked_model()
    with torch.no_grad():
        model.blocks[1].mixer.x_proj.mask_logits.fill_(-6.0)           # every block dropped
        model.blocks[0].mixer.in_proj.mask_logits[:4] = -1.0            # some blocks dropped
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sal = gradient_saliency(model, batches(), ALL)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    # layer 1's dt_proj reads x_proj's (all dropped) output: zero input, zero gradient, nothing worth adapting
    dead = {"blocks.1.mixer.x_proj", "blocks.1.mixer.dt_proj"}
    assert list(sal) == names(2) and all(sal[n] == 0.0 for n in dead)
    assert all(v > 0 for n, v in sal.items() if n not in dead)
    # reference: autograd through the evaluation forward of an independent copy
    ref = masked_model()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    w = ref.blocks[0].mixer.in_proj.weight
    w.requires_grad_(True)
    ids = batches()[0][0]
    ref(ids, labels=ids).loss.backward()
    assert w.grad[:4 * 8].abs().max() == 0                              # dropped rows get no gradient
    assert sal["blocks.0.mixer.in_proj"] == pytest.approx(float((w.detach() * w.grad).abs().mean()), rel=1e-6)


@pytest.mark.parametrize("source", ["saliency", "activations"])
def test_fully_pruned_module_gets_no_adapter(source: str) -> None:
    model = masked_model()
    with torch.no_grad():   # logits -6: the sign-blind mean |L| ranked exactly this module highest
        model.blocks[1].mixer.x_proj.mask_logits.fill_(-6.0)
    cfg = HybridPeftConfig(importance_source=source, importance_window=4, application_ratio=1.0)
    model.train()
    for _ in range(4):
        model(batches()[0][0])
    importance = module_importance(model, cfg, batches())
    pruned = pruned_modules(model)
    assert pruned == ["blocks.1.mixer.x_proj"]
    assert min(importance, key=importance.get) == "blocks.1.mixer.x_proj"
    decision = decide_allocation(importance, cfg, pruned=pruned)
    assert decision.kinds["blocks.1.mixer.x_proj"] == "frozen"
    assert decision.counts() == {"lora": 4, "ia3": 3, "frozen": 1}    # every live module adapted at ratio 1
    # even ranked first, a pruned module stays frozen; the quota is capped by the live modules
    decision = decide_allocation({**importance, "blocks.1.mixer.x_proj": 1e9}, cfg, pruned=pruned)
    assert decision.kinds["blocks.1.mixer.x_proj"] == "frozen"
    apply_allocation(model, decision, cfg)
    assert current_allocation(model)["blocks.1.mixer.x_proj"] == "frozen"


def masks_dropping_weights(model: AdaptiveMambaForCausalLM, seed: int = 3) -> None:
    """Random logit signs: about half of every mask's blocks / weights dropped, at least one kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.copy_(torch.randn(m.mask_logits.shape, generator=g) * 2)
            m.mask_logits.view(-1)[0] = 1.0
    assert all(0 < m.realised_sparsity() < 1 for m in masked_modules(model).values())


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("change", ["lora->frozen", "ia3->frozen", "lora->ia3", "ia3->lora"])
def test_merge_on_kind_change_is_exact_when_masks_drop_weights(kind: str, change: str) -> None:
    before, after = change.split("->")
    model = masked_model(kind=kind)
    masks_dropping_weights(model)
    cfg = HybridPeftConfig(lora_r=4)
    apply_allocation(model, AllocationDecision({n: before for n in names(2)}, {n: 0.0 for n in names(2)}), cfg)
    if before == "lora" and kind != "channel":   # a channel mask gates activations, so plain LoRA merges exactly
        assert all(isinstance(model.get_submodule(n).lora_variant["lora"], MaskedLoraVariant) for n in names(2))
    perturb_adapters(model, seed=1)
    ids = batches()[0][0]

    def logits(train: bool) -> torch.Tensor:
        model.train(train)
        torch.manual_seed(7)               # the same mask noise in training mode
        with torch.no_grad():
            return model(ids).logits

    ref_eval, ref_train = logits(False), logits(True)
    frozen_weights = {n: base_layer(model.get_submodule(n)).weight.clone() for n in names(2)}
    changes = apply_allocation(model, AllocationDecision({n: after for n in names(2)}, {n: 0.0 for n in names(2)},
                                                         step=1), cfg)
    assert changes["merged"] == names(2) and current_allocation(model) == {n: after for n in names(2)}
    torch.testing.assert_close(logits(False), ref_eval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(True), ref_train, rtol=1e-5, atol=1e-5)
    assert all(not torch.equal(base_layer(model.get_submodule(n)).weight, frozen_weights[n]) for n in names(2))


def test_unmasked_lora_would_not_merge_exactly() -> None:
    """The control for the test above: plain peft LoRA (update not masked) changes the logits when merged."""
    model = masked_model()
    masks_dropping_weights(model)
    cfg = HybridPeftConfig(lora_r=4)
    apply_allocation(model, AllocationDecision({n: "lora" for n in names(2)}, {n: 0.0 for n in names(2)}), cfg)
    for n in names(2):
        model.get_submodule(n).lora_variant.clear()
    perturb_adapters(model, seed=1)
    model.eval()
    ids = batches()[0][0]
    with torch.no_grad():
        ref = model(ids).logits
        apply_allocation(model, AllocationDecision({n: "frozen" for n in names(2)}, {n: 0.0 for n in names(2)}), cfg)
        assert (model(ids).logits - ref).abs().max() > 1e-3


def every_kind_on_every_projection(model: AdaptiveMambaForCausalLM, cfg: HybridPeftConfig) -> AllocationDecision:
    """LoRA on every projection of layer 0, IA3 on every projection of layer 1."""
    kinds = {n: ("lora" if n.startswith("blocks.0.") else "ia3") for n in names(2)}
    decision = AllocationDecision(kinds, module_importance(model, cfg, batches()))
    apply_allocation(model, decision, cfg)
    return decision


def test_every_adapter_gets_gradient_and_changes_every_path() -> None:
    model = masked_model()
    cfg = HybridPeftConfig(lora_r=4)
    every_kind_on_every_projection(model, cfg)
    assert current_allocation(model) == {n: ("lora" if n.startswith("blocks.0.") else "ia3") for n in names(2)}
    perturb_adapters(model)
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n or "ia3_l" in n}
    assert len(adapters) == 4 * 2 + 4                      # lora_A + lora_B on 4 projections, IA3 on 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        set(adapters) | {n for n, _ in model.named_parameters() if n.endswith("mask_logits")}

    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    model.eval()

    def paths() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            full = model(ids).logits
            first = model(ids[:, :12], use_cache=True)                             # chunked / recurrent scoring
            step = model(ids[:, 12:13], cache=first.cache, use_cache=True).logits  # one-token generation step
        return full, step, first.logits

    before = paths()
    for name, p in adapters.items():
        with torch.no_grad():
            saved = p.clone()
            p.add_(0.5)
            after = paths()
            p.copy_(saved)
        assert (after[0] - before[0]).abs().max() > 1e-4, f"{name} does not change the full forward"
        assert (after[1] - before[1]).abs().max() > 1e-4, f"{name} does not change the recurrent step"
        assert (after[2] - before[2]).abs().max() > 1e-4, f"{name} does not change the chunked forward"


@pytest.mark.parametrize("train_masks", [True, False])
def test_frozen_weights_are_bit_identical_after_training(train_masks: bool) -> None:
    model = masked_model(n_layer=4)
    cfg = HybridPeftConfig(train_masks=train_masks, lora_r=4)
    decision = decide_allocation(module_importance(model, cfg, batches()), cfg)
    apply_allocation(model, decision, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 128, (2, 24))
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        if "lora_" in name or "ia3_l" in name:
            assert changed, name
        elif name.endswith("mask_logits"):
            assert changed == train_masks, name
        else:
            assert not changed, f"frozen {name} changed"


def test_reallocation_is_deterministic_and_merging_keeps_outputs() -> None:
    cfg = HybridPeftConfig(lora_r=4)
    kinds1 = {n: k for n, k in zip(names(2), ["lora", "ia3", "frozen", "lora"] * 2)}
    kinds2 = {n: k for n, k in zip(names(2), ["ia3", "frozen", "lora", "lora"] * 2)}
    d1, d2 = AllocationDecision(kinds1, {n: 0.0 for n in kinds1}), AllocationDecision(kinds2, {n: 0.0 for n in kinds2},
                                                                                      step=5)
    models = []
    for _ in range(2):
        model = masked_model()
        apply_allocation(model, d1, cfg)
        perturb_adapters(model, seed=1)
        model.eval()              # hard masks keep every weight here (logits start at 3 +- 0.5)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits
        changes = apply_allocation(model, d2, cfg)
        assert changes["merged"] == [n for n in names(2) if kinds1[n] != kinds2[n] and kinds1[n] != "frozen"]
        assert changes["lora"] == [n for n in names(2) if kinds2[n] == "lora" and kinds1[n] != "lora"]
        assert current_allocation(model) == kinds2
        with torch.no_grad():     # merged adapters move into W; new LoRA (B = 0) and IA3 (= 1) start as identities
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert apply_allocation(model, d2, cfg) == {"merged": [], "removed": [], "lora": [], "ia3": []}
        models.append(model)
    a, b = (dict(m.state_dict()) for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(models[0].blocks[0].mixer.in_proj, IA3Layer)
    assert isinstance(models[0].blocks[0].mixer.dt_proj, LoraLayer)
    assert set(models[0].peft_config) == {"lora", "ia3"}
    assert models[0].peft_config["lora"].target_modules == {n for n in names(2) if kinds2[n] == "lora"}

    removed = masked_model()
    apply_allocation(removed, d1, cfg)
    perturb_adapters(removed, seed=1)
    apply_allocation(removed, d2, HybridPeftConfig(lora_r=4, on_kind_change="remove"))
    base = masked_model()
    for name in names(2):   # removed adapters leave the base weights untouched
        if kinds1[name] != "frozen":
            torch.testing.assert_close(base_layer(removed.get_submodule(name)).weight,
                                       base.get_submodule(name).weight, rtol=0, atol=0)


def test_trainable_report_matches_peft_and_130m_default_is_below_5_percent() -> None:
    model = masked_model()
    every_kind_on_every_projection(model, HybridPeftConfig(lora_r=4))
    report = trainable_report(model)
    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    assert report == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                      f"trainable%: {100 * trainable / total:.4f}")

    torch.manual_seed(0)
    big = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=768, n_layer=24, vocab_size=50277))
    apply_masks(big, MaskConfig())
    cfg = HybridPeftConfig(target_modules=MaskConfig().targets)       # training's defaults: peft follows the masks
    decision = decide_allocation({n: 1.0 for n in masked_modules(big)}, cfg)
    apply_allocation(big, decision, cfg)
    report = trainable_report(big)
    print(report)
    assert decision.counts() == {"lora": 11, "ia3": 11, "frozen": 50}      # 3 default targets x 24 layers
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", report)
    assert match and float(match.group(3)) < 5.0
    assert int(match.group(2).replace(",", "")) > 129_000_000


def test_save_load_restores_the_same_model(tmp_path) -> None:
    model = masked_model()
    cfg = HybridPeftConfig(lora_r=4, lora_alpha=8)
    decision = every_kind_on_every_projection(model, cfg)
    perturb_adapters(model)
    with torch.no_grad():
        model.blocks[0].mixer.x_proj.base_layer.mask_logits.neg_()       # some blocks dropped
    model.eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    save_adaptive_model(model, tmp_path)
    assert (tmp_path / "adapters" / "lora" / "adapter_model.safetensors").is_file()
    assert LoraConfig.from_pretrained(str(tmp_path / "adapters" / "lora")).r == 4
    assert IA3Config.from_pretrained(str(tmp_path / "adapters" / "ia3")).target_modules == set(decision.modules("ia3"))
    saved = json.loads((tmp_path / "allocation.json").read_text())
    assert saved["table"][0] == "blocks.0.mixer.in_proj: " + f"{decision.importance['blocks.0.mixer.in_proj']:.4g}" \
        + " -> LoRA"

    loaded = load_adaptive_model(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in loaded.named_parameters()}
    assert trainable_report(loaded) == trainable_report(model)

    plain = AdaptiveMambaForCausalLM.from_pretrained(tmp_path)           # the base weights alone still load
    torch.testing.assert_close(plain.blocks[0].mixer.in_proj.weight, model.blocks[0].mixer.in_proj.base_layer.weight)


def test_random_importance_is_a_seeded_control() -> None:
    """importance_source=random: the same values on every rank (seed, step, name), new ones at another step."""
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=16, n_layer=2, vocab_size=64))
    cfg = HybridPeftConfig(importance_source="random", seed=3)
    first, again = module_importance(model, cfg, step=5), module_importance(model, cfg, step=5)
    later = module_importance(model, cfg, step=6)
    assert first == again and first != later
    assert list(first) == [name for name, *_ in iter_projections(model, cfg.target_modules)]
    assert all(0.0 <= v < 1.0 for v in first.values()) and len(set(first.values())) == len(first)


def test_configs_and_runs_without_adapters_do_not_import_peft() -> None:
    """peft loads transformers (seconds in every process): reading a training config, importing the trainer, and a
    run's allocation and export-FLOPs model without adapters must not import it; applying adapters does."""
    code = """if True:
        import sys
        from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
        from adaptive_mamba.pillars import HybridPeftConfig, apply_allocation, current_allocation, uniform_allocation
        from adaptive_mamba.training.adaptation import merged_plain_model
        from adaptive_mamba.training.config import load_train_config
        from adaptive_mamba.training.trainer import Trainer

        load_train_config(None, ["data.source=stdlib", "peft.lora_r=4"])
        model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=16, n_layer=1, vocab_size=32))
        assert set(current_allocation(model).values()) == {"frozen"}
        merged_plain_model(model)
        assert "peft" not in sys.modules and "transformers" not in sys.modules, "imported without adapters"
        model, cfg = AdaptiveMambaForCausalLM(model.config), HybridPeftConfig()
        apply_allocation(model, uniform_allocation(model, "lora", cfg), cfg)
        assert set(current_allocation(model).values()) == {"lora"}
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
