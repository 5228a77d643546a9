"""The pillar controller drives a training run only through the `TrainingRun` protocol: a plain-PyTorch run (one
process, torch AdamW, no DeepSpeed) that implements it gets scan-order refreshes (exact reparametrisations, before
and after adapters exist) and a hybrid PEFT allocation, and adaptation.py does not import the trainer."""
from __future__ import annotations

import ast
import copy
import inspect
from typing import Callable, Iterable

import torch
from torch import Tensor

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.training import adaptation
from adaptive_mamba.training.adaptation import PillarController
from adaptive_mamba.training.config import load_train_config
from adaptive_mamba.training.distributed import DistContext


class PlainRun:
    """TrainingRun over a model trained in this process by torch AdamW."""

    partitioned = False

    def __init__(self, pillars: PillarController, model: AdaptiveMambaForCausalLM, batches: list[tuple[Tensor, Tensor]]):
        self.pillars, self.batches, self.device = pillars, batches, torch.device("cpu")
        self.rebuilds = 0
        self.rebuild_engine(model)

    def full_model(self) -> AdaptiveMambaForCausalLM:
        """Like the trainer's: the current pillar structure on a fresh base model, then the current weights."""
        model = self.pillars.build_structure(AdaptiveMambaForCausalLM(copy.deepcopy(self.model.config)))
        model.load_state_dict(self.model.state_dict(), strict=True)
        return model

    def permute_parameters(self, plan: Iterable[tuple[str, Callable[[Tensor], Tensor]]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, fn in plan:
                params[name].copy_(fn(params[name]))
                for moment in self.optimizer.state.get(params[name], {}).values():
                    if moment.dim():
                        moment.copy_(fn(moment))

    def rebuild_engine(self, model: AdaptiveMambaForCausalLM) -> None:
        self.model, self.rebuilds = model, self.rebuilds + 1
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        self.pillars.attach(model)

    def upcoming_batches(self) -> list[tuple[Tensor, Tensor]]:
        return self.batches

    def train_step(self, step: int) -> None:
        self.model.train()
        self.pillars.on_step_begin(self.model, step)
        for ids, labels in self.batches:
            loss = self.model(ids, labels=labels).loss + self.pillars.regularizer(self.model)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


@torch.no_grad()
def eval_logits(model: AdaptiveMambaForCausalLM, ids: Tensor) -> Tensor:
    return model.eval()(ids).logits


def test_controller_adapts_any_training_run_through_the_protocol() -> None:
    cfg = load_train_config(None, ["data.source=stdlib", "scan_order.every=2", "peft.start_step=3", "peft.every=0",
                                   "masks.learning_rate=0.2"])
    pillars = PillarController(cfg, DistContext(), total_steps=6)
    torch.manual_seed(0)
    model = pillars.build_structure(AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2,
                                                                                 vocab_size=128)))
    gen = torch.Generator().manual_seed(1)
    batches = [(ids, ids.clone()) for ids in torch.randint(0, 128, (2, 1, 48), generator=gen)]
    run = PlainRun(pillars, model, batches)
    probe = torch.randint(0, 128, (1, 48), generator=gen)
    decisions = []
    for step in range(1, 5):
        run.train_step(step - 1)
        before = eval_logits(run.model, probe)
        events = pillars.maybe_refresh(run, step)
        decisions.append(events["decisions"])
        if events["decisions"] == ["scan_order"]:     # a reparametrisation: the function is unchanged
            torch.testing.assert_close(eval_logits(run.model, probe), before, rtol=1e-5, atol=1e-5)
    assert decisions == [[], ["scan_order"], ["allocation"], ["scan_order"]]
    assert run.rebuilds == 2 and pillars.allocation_history[-1]["step"] == 3
    adapted = [n for n, p in run.model.named_parameters() if p.requires_grad and ("lora_" in n or "ia3_" in n)]
    assert adapted, "the allocation put no adapter on the run's model"
    order = run.model.config.extra["scan_order"]
    assert order == pillars.scan_order and any(o != sorted(o) for o in order)


def test_adaptation_does_not_import_the_trainer() -> None:
    tree = ast.parse(inspect.getsource(adaptation))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "adaptive_mamba.training.trainer" not in imported and "adaptive_mamba.training.engine" not in imported
