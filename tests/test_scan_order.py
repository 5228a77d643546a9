"""Pillar 1: scan-order statistics, the path search, and the exact reparametrisation (outputs, gradients,
optimizer state, masks, adapters, save/load)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.pillars import (AllocationDecision, HybridPeftConfig, MaskConfig, ScanOrderDecision,
                                    ScanStatsCollector, apply_allocation, apply_masks, apply_scan_order,
                                    current_scan_order, decide_scan_order, load_adaptive_model, masked_modules,
                                    reorder_block_sizes, reparametrization_plan, save_adaptive_model)
from adaptive_mamba.pillars.scan_order import PermuteOp, best_path, correlation, path_cost

ALL = ("in_proj", "x_proj", "dt_proj", "out_proj")


def tiny_model(n_layer: int = 2, seed: int = 0) -> AdaptiveMambaForCausalLM:
    torch.manual_seed(seed)
    return AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=n_layer, vocab_size=128))


def block_data(n_blocks: int = 6, width: int = 8, tokens: int = 4000, seed: int = 0):
    """Channels in blocks driven by one latent factor each (strong within-block correlation), shuffled."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((tokens, n_blocks))
    x = np.repeat(latent, width, axis=1) + 0.4 * rng.standard_normal((tokens, n_blocks * width))
    shuffle = rng.permutation(n_blocks * width)
    x = torch.from_numpy(x[:, shuffle])
    block_of = np.repeat(np.arange(n_blocks), width)[shuffle]
    return (x.sum(0), x.T @ x, torch.tensor(float(tokens), dtype=torch.float64)), block_of


def test_path_search_recovers_blocks_and_beats_identity_and_random() -> None:
    stats, block_of = block_data()
    decision = decide_scan_order([stats])
    order = np.array(decision.perms[0])
    cost = 1 - np.abs(correlation(stats))
    random_costs = [path_cost(cost, np.random.default_rng(s).permutation(len(order))) for s in range(20)]
    assert decision.cost_identity[0] == pytest.approx(path_cost(cost, np.arange(len(order))))
    assert decision.cost_after[0] == pytest.approx(path_cost(cost, order))
    assert decision.cost_after[0] <= decision.cost_greedy[0]
    assert decision.cost_after[0] < 0.5 * min(random_costs) and decision.cost_after[0] < 0.5 * decision.cost_identity[0]
    blocks_along_path = block_of[order]
    assert int((blocks_along_path[1:] != blocks_along_path[:-1]).sum()) == 5     # each block is one contiguous run
    assert sorted(order.tolist()) == list(range(48))


def test_two_opt_result_is_a_local_optimum() -> None:
    """No single segment reversal (the 2-opt move, including prefixes and suffixes) lowers the path cost."""
    rng = np.random.default_rng(3)
    pts = rng.random((30, 2))
    cost = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    order, greedy, after = best_path(cost, n_starts=4)
    assert after <= greedy + 1e-12 and after == pytest.approx(path_cost(cost, order))
    for i in range(len(order)):
        for j in range(i + 1, len(order)):
            trial = order.copy()
            trial[i:j + 1] = trial[i:j + 1][::-1]
            assert path_cost(cost, trial) >= after - 1e-9


def test_collector_statistics_and_zero_cost_when_off() -> None:
    model = tiny_model()
    collector = ScanStatsCollector(model)
    assert all(not b.mixer.scan_input._forward_hooks for b in model.blocks)
    captured = []
    handle = model.blocks[1].mixer.scan_input.register_forward_hook(lambda m, i, u: captured.append(u.detach()))
    collector.enable()
    ids = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        model(ids)
    collector.disable()
    handle.remove()
    assert all(not b.mixer.scan_input._forward_hooks for b in model.blocks)
    x = captured[0].transpose(1, 2).reshape(-1, 128).double()
    s, outer, count = collector.stats[1]
    assert float(count) == 60
    torch.testing.assert_close(s, x.sum(0))
    torch.testing.assert_close(outer, x.T @ x)
    # each forward's sums are rounded to a 2^-24 grid (exact accumulation), ~1e-7 of these 60 tokens' variances
    np.testing.assert_allclose(correlation(collector.stats[1]), np.corrcoef(x.numpy().T), atol=1e-6)
    tensors = collector.state_tensors()
    assert len(tensors) == 6 and all(t.dtype == torch.float64 for t in tensors)
    with torch.no_grad():
        model(ids)                      # disabled: nothing more is counted
    assert float(collector.stats[1][2]) == 60
    collector.reset()
    assert all(float(t.abs().sum()) == 0 for t in tensors)


def test_statistics_do_not_depend_on_how_batches_are_split() -> None:
    """One collector over four batches holds bit-for-bit the sum of two collectors over two batches each (one
    process with accumulation vs two ranks, all-reduced): float64 accumulation alone differs in the last bits, and
    at a near-tie that flips the scan-order decision."""
    model = tiny_model()
    batches = [torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def collect(ids_list):
        collector = ScanStatsCollector(model)
        collector.enable()
        with torch.no_grad():
            for ids in ids_list:
                model(ids)
        collector.disable()
        return collector.state_tensors()

    whole, rank0, rank1 = collect(batches), collect(batches[0::2]), collect(batches[1::2])
    for w, a, b in zip(whole, rank0, rank1):
        assert torch.equal(w, a + b)
    assert decide_scan_order([tuple(whole[i:i + 3]) for i in range(0, 6, 3)], block_sizes=[8, 8]).perms == \
        decide_scan_order([tuple((a + b) for a, b in zip(rank0[i:i + 3], rank1[i:i + 3])) for i in range(0, 6, 3)],
                          block_sizes=[8, 8]).perms


def test_decision_round_trips_through_json() -> None:
    stats, _ = block_data(n_blocks=3, width=4)
    decision = decide_scan_order([stats, stats], step=7)
    again = ScanOrderDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again == decision and again.step == 7
    with pytest.raises(ValueError, match="at least 2 tokens"):
        decide_scan_order([(torch.zeros(4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64),
                            torch.zeros((), dtype=torch.float64))])


def collect_decision(model: AdaptiveMambaForCausalLM, ids: torch.Tensor) -> ScanOrderDecision:
    collector = ScanStatsCollector(model)
    collector.enable()
    was_training = model.training
    model.train()                                # the collector records training forwards only
    with torch.no_grad():
        model(ids)
    model.train(was_training)
    collector.disable()
    decision = decide_scan_order(collector, block_sizes=reorder_block_sizes(model))   # [1, ...] unless blocks bind
    assert all(p != list(range(len(p))) for p in decision.perms), "the decision must be a non-trivial permutation"
    return decision


def adapt(model: AdaptiveMambaForCausalLM, masks: MaskConfig) -> None:
    """Masks of `masks`, LoRA on layer 0 and IA3 on layer 1, adapters made non-trivial."""
    apply_masks(model, masks)
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.normal_(0.5, 1.0)          # some weights (or blocks) dropped by the hard mask
    add_adapters(model)


def add_adapters(model: AdaptiveMambaForCausalLM) -> None:
    """LoRA on every projection of layer 0, IA3 on those of layer 1, adapters made non-trivial."""
    kinds = {f"blocks.{i}.mixer.{p}": ("lora" if i == 0 else "ia3") for i in range(2) for p in ALL}
    apply_allocation(model, AllocationDecision(kinds, {k: 0.0 for k in kinds}), HybridPeftConfig(lora_r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "ia3_l" in name:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("masks", [None, MaskConfig(kind="unstructured", targets=ALL), MaskConfig()],
                         ids=["plain", "masks+lora+ia3", "default-masks+lora+ia3"])
def test_permutation_is_an_exact_reparametrisation(masks: MaskConfig | None, tmp_path) -> None:
    """With the default masks (structured, block 8, learned logits) whole blocks move, so the refresh stays exact."""
    model = tiny_model()
    adapted = masks is not None
    if adapted:
        adapt(model, masks)
    model.eval()                                 # hard masks, no dropout
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    original = copy.deepcopy(model)
    decision = collect_decision(model, ids)

    out = original(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in original.named_parameters() if p.grad is not None}
    ref_logits = out.logits.detach()

    plan = reparametrization_plan(model, decision)
    names = {op.name for op in plan}
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.conv1d.weight", "blocks.1.mixer.D"} <= names
    if adapted:   # mask logits and adapter weights are in the plan too
        assert {"blocks.0.mixer.in_proj.base_layer.mask_logits", "blocks.0.mixer.in_proj.lora_B.lora.weight",
                "blocks.0.mixer.out_proj.lora_A.lora.weight", "blocks.1.mixer.in_proj.ia3_l.ia3",
                "blocks.1.mixer.x_proj.ia3_l.ia3"} <= names
    apply_scan_order(model, decision)
    out2 = model(ids, labels=ids)
    out2.loss.backward()
    assert (out2.logits.detach() - ref_logits).abs().max() <= 1e-5
    by_name = {op.name: op for op in plan}
    for name, p in model.named_parameters():
        if name not in grads:
            continue
        expected = by_name[name].apply(grads[name]) if name in by_name else grads[name]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=name)

    assert current_scan_order(model) == decision.perms
    save_adaptive_model(model, tmp_path)
    loaded = load_adaptive_model(tmp_path).eval()
    assert current_scan_order(loaded) == decision.perms
    with torch.no_grad():
        assert (loaded(ids).logits - ref_logits).abs().max() <= 1e-5


def test_orders_compose_and_optimizer_state_follows() -> None:
    """Adam steps interleaved with two reorders give the permuted parameters of the same run without reorders."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (a, b))
    for _ in range(2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
        decision = collect_decision(a, ids)
        apply_scan_order(a, decision, optimizer=opt_a)
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    orders = current_scan_order(a)
    identity = ScanOrderDecision([list(range(128))] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2)
    assert reparametrization_plan(b, identity) == []
    total = ScanOrderDecision(orders, [0.0] * 2, [0.0] * 2, [0.0] * 2)   # cumulative order applied at once
    apply_scan_order(b, total)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def test_block_logits_follow_block_aligned_permutations_exactly() -> None:
    model = tiny_model()
    apply_masks(model, MaskConfig(kind="structured", block_size=8, targets=ALL))
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.normal_()
    model.eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    blocks = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    perm = (blocks[:, None] * 8 + torch.arange(8)).flatten().tolist()       # whole blocks move
    apply_scan_order(model, ScanOrderDecision([perm, perm], [0.0] * 2, [0.0] * 2, [0.0] * 2))
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() <= 1e-5
    op = PermuteOp("x", 0, torch.tensor([1, 0, 0, 1]), block_size=2)    # channels from blocks (1,0) and (0,1)
    assert not op.is_exact_for(torch.tensor([2.0, 4.0]))                 # would mix two different logits
    assert op.is_exact_for(torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(op.apply(torch.tensor([3.0, 3.0])), torch.tensor([3.0, 3.0]))   # a copy, no mean


def masked_tiny_model(kind: str) -> AdaptiveMambaForCausalLM:
    """The default masks (MaskConfig: block size 8 on in_proj, x_proj, out_proj) or another kind, learned-looking
    logits of both signs."""
    model = tiny_model()
    apply_masks(model, MaskConfig(kind=kind))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in masked_modules(model).values():
            m.mask_logits.copy_(torch.randn(m.mask_logits.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["structured", "unstructured", "channel"])
def test_refresh_with_default_masks_is_exact(kind: str) -> None:
    """A refresh decided from real statistics leaves eval logits and every module's realised sparsity unchanged."""
    model = masked_tiny_model(kind)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    collector = ScanStatsCollector(model)
    collector.enable()
    model.train()
    model(ids)
    model.eval()
    sizes = reorder_block_sizes(model)
    assert sizes == ([8, 8] if kind == "structured" else [1, 1])     # channel / unstructured: free
    decision = decide_scan_order(collector, block_sizes=sizes)
    assert all(p != list(range(len(p))) for p in decision.perms)
    if kind == "structured":      # whole blocks of 8 move together
        for perm in decision.perms:
            blocks = torch.tensor(perm).view(-1, 8) // 8
            assert bool((blocks == blocks[:, :1]).all())
    sparsity = {n: m.realised_sparsity() for n, m in masked_modules(model).items()}
    logits = {n: m.mask_logits.detach().clone() for n, m in masked_modules(model).items()}
    with torch.no_grad():
        ref = model(ids).logits
        apply_scan_order(model, decision, collector=collector)
        out = model(ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert {n: m.realised_sparsity() for n, m in masked_modules(model).items()} == sparsity
    if kind == "channel":         # each channel's logit moved with its channel
        for i, perm in enumerate(decision.perms):
            name = f"blocks.{i}.mixer.channel_mask"
            assert torch.equal(masked_modules(model)[name].mask_logits, logits[name][torch.tensor(perm)])


def test_free_reorder_only_while_block_logits_are_equal() -> None:
    """Unlearned (equal) block logits allow any permutation (values copied); learned ones must move as blocks."""
    model = tiny_model()
    apply_masks(model, MaskConfig(kind="structured", block_size=8, targets=ALL, init_std=0.0))
    assert reorder_block_sizes(model) == [1, 1]
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1)).tolist()
    decision = ScanOrderDecision([perm, perm], [0.0] * 2, [0.0] * 2, [0.0] * 2)
    apply_scan_order(model, decision)
    assert all(bool((m.mask_logits == 3.0).all()) for m in masked_modules(model).values())
    with torch.no_grad():
        model.blocks[0].mixer.in_proj.mask_logits[0] = -1.0
    assert reorder_block_sizes(model) == [8, 1]
    with pytest.raises(ValueError, match="splits blocks of a structured mask"):
        reparametrization_plan(model, decision)


def test_collector_counts_training_tokens_once_under_checkpointing() -> None:
    """Evaluation forwards record nothing; the recomputation of checkpointed blocks in backward is not counted."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    stats = []
    for ckpt in (False, True):
        model = tiny_model()
        model.config.gradient_checkpointing = ckpt
        collector = ScanStatsCollector(model)
        collector.enable()
        model.eval()
        with torch.no_grad():
            model(ids)
        assert all(float(c) == 0 for _, _, c in collector.stats)
        model.train()
        model(ids, labels=ids).loss.backward()
        assert all(float(c) == ids.numel() for _, _, c in collector.stats)
        stats.append(collector.state_tensors())
    for plain, checkpointed in zip(*stats):
        torch.testing.assert_close(plain, checkpointed)


def test_plan_rejects_bad_decisions() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="decision has 1 layers, the model 2"):
        reparametrization_plan(model, ScanOrderDecision([list(range(128))], [0.0], [0.0], [0.0]))
    with pytest.raises(ValueError, match="not a permutation"):
        reparametrization_plan(model, ScanOrderDecision([[0] * 128] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2))


def test_real_text_activations_get_a_cheaper_order(shared_data) -> None:
    from adaptive_mamba.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_data / "tokenizers" / "gpt-neox-20b")
    text = (shared_data / "books" / "austen_emma.txt").read_text()[:20_000]
    vocab, ids = torch.unique(torch.tensor(tok.encode(text)), return_inverse=True)
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=64, n_layer=2, vocab_size=len(vocab)))
    decision = collect_decision(model, ids[:2048].view(4, 512))
    for layer in range(2):
        assert decision.cost_after[layer] < 0.95 * decision.cost_identity[layer]
    print(decision.summary())


def test_decision_spread_over_ranks_equals_the_single_process_one() -> None:
    """Each rank decides layers rank, rank + world, ... and the all-gather gives every rank the whole decision,
    equal to the single-process one (3 ranks as threads with a barrier all-gather; 5 layers, so shares differ)."""
    import threading

    layers = [block_data(seed=s)[0] for s in range(5)]
    single = decide_scan_order(layers, step=7).to_dict()
    world, box, results = 3, [None] * 3, [None] * 3
    barrier = threading.Barrier(world)

    def rank(r: int) -> None:
        def exchange(mine):
            box[r] = mine
            barrier.wait()
            return list(box)
        results[r] = decide_scan_order(layers, step=7, rank=r, world_size=world, exchange=exchange).to_dict()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [single] * world
    assert [len(part) for part in box] == [2, 2, 1]                  # layers 0 3 | 1 4 | 2
    with pytest.raises(ValueError, match="needs `exchange`"):
        decide_scan_order(layers, rank=0, world_size=2)


def test_collector_token_stride_reads_every_nth_token_and_refresh_stays_exact() -> None:
    """token_stride n accumulates tokens 0, n, 2n, ... of each forward (flattened over the batch); the trainer's
    default stride is the scan_order section's, and a decision from strided statistics is still an exact refresh."""
    from adaptive_mamba.pillars.scan_order import ScanOrderConfig
    from adaptive_mamba.training.config import load_train_config

    model = tiny_model().train()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.blocks[0].mixer.scan_input.register_forward_hook(lambda m, i, u: seen.append(u.detach().clone()))
    stride = ScanOrderConfig().token_stride
    collector = ScanStatsCollector(model, token_stride=stride)
    collector.enable()
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = seen[0].transpose(1, 2).reshape(-1, seen[0].shape[1])[::stride].double()
    s, outer, count = collector.stats[0]
    assert float(count) == len(range(0, 80, stride)) and stride > 1
    torch.testing.assert_close(s, x.sum(0))
    torch.testing.assert_close(outer, x.T @ x)
    decision = decide_scan_order(collector)
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits
        apply_scan_order(model, decision, collector=collector)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scan_order.token_stride"):
        load_train_config(None, ["data.source=stdlib", "scan_order.token_stride=0"])
