"""TrainConfig: the section tree, YAML + dotted overrides, old flat keys, errors, --help and the generated docs,
the generated DeepSpeed config and the learning-rate schedule (no processes launched)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from adaptive_mamba.config import AdaptiveMambaConfig
from adaptive_mamba.data import DataConfig
from adaptive_mamba.pillars.hybrid_peft import HybridPeftConfig
from adaptive_mamba.pillars.masks import MaskConfig
from adaptive_mamba.pillars.scan_order import ScanOrderConfig
from adaptive_mamba.training.config import (DEPRECATED_KEYS, OptimConfig, TrainConfig, TrainSection, config_keys,
                                            load_train_config, parse_overrides)
from adaptive_mamba.training.config_docs import markdown
from adaptive_mamba.training.engine import deepspeed_config, zero_stage
from adaptive_mamba.training.trainer import lr_at

REPO = Path(__file__).resolve().parents[1]
STDLIB = DataConfig(source="stdlib")


def load_quietly(path: Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """load_train_config that fails on any warning (the repo's configs use the current keys)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_train_config(path, overrides)


def test_repo_configs_load_without_deprecated_keys() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name == "study.yaml":           # the study's definition: its run configs are tested in test_study
            continue
        cfg = load_quietly(path)
        ds = deepspeed_config(cfg, world_size=2)
        assert zero_stage(ds) == cfg.train.zero_stage and ds["bf16"]["enabled"] == (cfg.train.precision == "bf16")


def test_sections_are_the_library_dataclasses(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {d_model: 48}\noptim: {lr: 0.01}\ndata: {source: stdlib}\ntrain: {init_from: null}\n"
                    "masks: {targets: [in_proj, out_proj], schedule: linear}\n")
    cfg = load_quietly(path, ["train.seq_len=4096", "optim.lr=3e-4", "logging.wandb=false", "train.resume=auto",
                              "train.gradient_checkpointing=auto", "model.vocab_size=none", "peft.on_kind_change=remove",
                              "scan_order.token_stride=4", "data.hf_split=validation", "data.num_workers=3",
                              "train.seed=7"])
    assert isinstance(cfg.model, AdaptiveMambaConfig) and isinstance(cfg.masks, MaskConfig)
    assert isinstance(cfg.peft, HybridPeftConfig) and isinstance(cfg.scan_order, ScanOrderConfig)
    assert (cfg.model.d_model, cfg.train.seq_len, cfg.optim.lr, cfg.logging.wandb) == (48, 4096, 3e-4, False)
    assert cfg.use_gradient_checkpointing and cfg.model.gradient_checkpointing and cfg.model.vocab_size is None
    assert cfg.masks.targets == ("in_proj", "out_proj") and cfg.masks.schedule == "linear"
    assert (cfg.peft.on_kind_change, cfg.scan_order.token_stride) == ("remove", 4)
    prep = cfg.data.prep_config(tmp_path, cfg.train.seed)
    assert (prep.hf_split, prep.num_workers, prep.seed, prep.source) == ("validation", 3, 7, "stdlib")
    # settings that follow another key: one name each
    assert cfg.peft.seed == 7 and cfg.peft.target_modules == ("in_proj", "out_proj")
    assert cfg.model_config(2048).vocab_size == 2048 and cfg.model.vocab_size is None
    assert not load_quietly(None, ["data.source=stdlib", "train.seq_len=512"]).use_gradient_checkpointing
    assert load_quietly(None, ["data.dir=x", "masks.targets=in_proj,x_proj"]).masks.targets == ("in_proj", "x_proj")
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"model": {"n_layer": 3}, "data": {"dir": "x"}}))
    assert load_quietly(json_path).model.n_layer == 3


def test_unknown_keys_suggest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'masks.blocksize' \(did you mean 'masks.block_size'"):
        parse_overrides(["masks.blocksize=16"])
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'optim.lr'\?\)"):
        parse_overrides(["learning_rat=1e-3"])
    with pytest.raises(ValueError, match=r"'block_size' \(did you mean 'masks.block_size'\?\)"):
        parse_overrides(["block_size=4"])
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: stdlib}\nscan_order: {evry: 10}\n")
    with pytest.raises(ValueError, match=rf"^config file {path}: unknown config key 'scan_order.evry' \(did you mean "
                                         "'scan_order.every'"):
        load_train_config(path)
    with pytest.raises(ValueError, match="peft.seed is not a training setting: it follows train.seed"):
        parse_overrides(["peft.seed=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ValueError, match="cannot parse logging.wandb='maybe'"):
        parse_overrides(["logging.wandb=maybe"])


def test_invalid_values_and_missing_data() -> None:
    with pytest.raises(ValueError, match=r"TrainSection.precision='fp16' is invalid: it must be one of \['fp32', 'bf16'\]"):
        TrainConfig(data=STDLIB, train=TrainSection(precision="fp16"))
    with pytest.raises(ValueError, match="TrainSection.seq_len=1 is invalid: it must be >= 2"):
        TrainConfig(data=STDLIB, train=TrainSection(seq_len=1))
    with pytest.raises(ValueError, match="set data.dir"):
        TrainConfig()
    with pytest.raises(ValueError, match="peft.importance_source=activations needs masks.enabled=true"):
        TrainConfig(data=STDLIB, masks=MaskConfig(enabled=False), peft=HybridPeftConfig(importance_source="activations"))
    with pytest.raises(ValueError, match="no mask history before the first step"):
        TrainConfig(data=STDLIB, train=TrainSection(init_from="m"), peft=HybridPeftConfig(importance_source="activations"))
    with pytest.raises(ValueError, match="peft.mode=full trains every weight"):
        TrainConfig(data=STDLIB, train=TrainSection(freeze_base=True), peft=HybridPeftConfig(mode="full"))
    with pytest.raises(ValueError, match="peft.mode='dora' is invalid: it must be one of"):
        load_train_config(None, ["data.source=stdlib", "peft.mode=dora"])
    assert TrainConfig(data=STDLIB, masks=MaskConfig(enabled=False)).first_allocation_step == 100   # from scratch
    assert TrainConfig(data=STDLIB, train=TrainSection(init_from="m")).first_allocation_step == 0   # fine-tune
    assert not TrainConfig(data=STDLIB, train=TrainSection(init_from="m"),
                           peft=HybridPeftConfig(mode="full")).freeze_base_weights


@pytest.mark.parametrize("stage, offload, precision", [(0, "none", "fp32"), (1, "none", "bf16"), (2, "none", "fp32"),
                                                       (2, "cpu", "bf16"), (3, "none", "fp32"), (3, "cpu", "bf16")])
def test_deepspeed_config_is_generated(stage: int, offload: str, precision: str) -> None:
    cfg = TrainConfig(data=STDLIB, optim=OptimConfig(grad_clip=0.5), train=TrainSection(
        zero_stage=stage, offload=offload, precision=precision, batch_size=2, grad_accum_steps=3))
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] == (precision == "bf16") and zero_stage(ds) == stage and "optimizer" not in ds
    zero = ds["zero_optimization"]
    assert ("offload_optimizer" in zero) == (offload == "cpu") and ("offload_param" in zero) == (offload == "cpu"
                                                                                                and stage == 3)


def test_deepspeed_extra_is_merged_and_checked(tmp_path: Path) -> None:
    def ds(extra: dict | None, **train) -> dict:
        path = tmp_path / "extra.json"
        path.write_text(json.dumps(extra))
        return deepspeed_config(TrainConfig(data=STDLIB, train=TrainSection(deepspeed_extra=str(path), **train)), 1)

    example = REPO / "ds_configs" / "extra_example.json"
    merged = deepspeed_config(TrainConfig(data=STDLIB, train=TrainSection(deepspeed_extra=str(example))), 1)
    assert all(not k.startswith("_") for k in merged) and merged["zero_optimization"]["stage"] == 2
    got = ds({"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True,
              "train_micro_batch_size_per_gpu": 1})
    assert got["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "overlap_comm": False,
                                        "reduce_bucket_size": 1000} and got["wall_clock_breakdown"]
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=4 disagrees with the training config \(1\)"):
        ds({"train_micro_batch_size_per_gpu": 4})
    with pytest.raises(ValueError, match=r"zero_optimization.stage=3 disagrees"):
        ds({"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=r"bf16.enabled=True disagrees"):
        ds({"bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="defines an optimizer"):
        ds({"optimizer": {"type": "Adam"}})
    with pytest.raises(ValueError, match="train.offload=cpu needs a ZeRO stage >= 1"):
        ds({}, zero_stage=0, offload="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        deepspeed_config(TrainConfig(data=STDLIB, train=TrainSection(deepspeed_extra=str(tmp_path / "no.json"))), 1)


def test_lr_schedule() -> None:
    cfg = TrainConfig(data=STDLIB, optim=OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1))
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))       # cosine decays monotonically after warmup
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_at(100, cfg, 20) == pytest.approx(0.1)
    cfg.optim.schedule = "constant"
    assert lr_at(7, cfg, 20) == 1.0


@pytest.mark.parametrize("typed, expected", [
    ("masks.learning_rate=-1", "command line: masks.learning_rate=-1.0 is invalid: it must be > 0"),
    ("optim.weight_decay=-0.1", "command line: optim.weight_decay=-0.1 is invalid: it must be >= 0"),
    ("--peft.lora-r=0", "command line: --peft.lora-r=0 is invalid: it must be >= 1"),
    ("optim.beta2=1", "command line: optim.beta2=1.0 is invalid: it must be in [0, 1)"),
    ("eval.batches=0", "command line: eval.batches=0 is invalid: it must be >= 1"),
    ("masks.tau_end=0", "command line: masks.tau_end=0.0 is invalid: it must be > 0"),
    ("train.max_steps=ten", "command line: train.max_steps='ten' is invalid: it must be an integer"),
    ("masking_tau_final=0", "command line: masking_tau_final=0.0 is invalid: it must be > 0"),    # an old name
])
@pytest.mark.filterwarnings("ignore:command line. flat config keys:FutureWarning")
def test_every_numeric_field_is_validated_by_the_name_typed(typed: str, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        load_train_config(None, ["data.source=stdlib", typed])
    assert str(err.value) == expected


def test_config_file_values_are_validated_by_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: stdlib}\npeft: {lora_r: 2.5}\n")
    with pytest.raises(ValueError, match=rf"^config file {path}: peft.lora_r=2.5 is invalid: it must be an integer$"):
        load_train_config(path)
    path.write_text("data: {source: stdlib}\noptim: {lr: fast}\n")
    with pytest.raises(ValueError, match="optim.lr='fast' is invalid: it must be a number"):
        load_train_config(path)


def test_old_flat_keys_map_with_one_deprecation_line(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("data_source: stdlib\nmask_block_size: 16\nmask_targets: in_proj,out_proj\npeft_r: 4\n"
                    "deepspeed_config: ds_configs/zero3_offload.json\nnan_policy: error\nscan_order: false\n")
    with pytest.warns(FutureWarning) as caught:
        cfg = load_train_config(path, ["learning_rate=0.02", "masks.tau_start=2.0", "peft=false"])
    lines = [str(w.message) for w in caught]
    assert len(lines) == 2 and all("\n" not in line for line in lines)       # one line per source
    assert lines[0].startswith(f"config file {path}: flat config keys are deprecated") and \
        "mask_block_size -> masks.block_size" in lines[0] and "peft_r -> peft.lora_r" in lines[0] and \
        "deepspeed_config -> train.zero_stage=3 train.offload=cpu" in lines[0] and "nan_policy (removed" in lines[0]
    assert lines[1] == ("command line: flat config keys are deprecated and will be removed in the next release: "
                        "learning_rate -> optim.lr, peft -> peft.enabled")
    assert (cfg.masks.block_size, cfg.masks.targets, cfg.peft.lora_r, cfg.optim.lr) == (16, ("in_proj", "out_proj"),
                                                                                         4, 0.02)
    assert (cfg.train.zero_stage, cfg.train.offload, cfg.scan_order.enabled, cfg.peft.enabled) == (3, "cpu", False,
                                                                                                   False)
    assert cfg.masks.tau_start == 2.0 and cfg.data.source == "stdlib"
    assert set(DEPRECATED_KEYS.values()) <= set(config_keys())          # every old key has a current home


def test_help_lists_every_field_with_default_and_doc() -> None:
    out = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--help"], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    for key, f in config_keys().items():
        assert f"    {key} = " in out, key
        assert f.metadata["doc"], f"{key} has no doc"
    assert "    masks.block_size = 8  (int)\n        channels per block (structured)" in out


def test_configuration_doc_is_current() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == markdown(), ("docs/configuration.md is stale: regenerate it with "
                               "`python -m adaptive_mamba.training.config_docs > docs/configuration.md`")


@pytest.mark.parametrize("flag, value, expected", [
    ("--val-fraction", "1.5", "argument --val-fraction: 1.5 is invalid: it must be >= 0 and < 1"),
    ("--workers", "0", "argument --workers: 0 is invalid: it must be >= 1"),
    ("--max-mb", "-2", "argument --max-mb: -2 is invalid: it must be > 0"),
    ("--shard-mb", "x", "argument --shard-mb: 'x' is not a number"),
])
def test_data_prep_cli_errors_name_the_flag(flag: str, value: str, expected: str, capsys) -> None:
    from data_prep.prepare import parse_args

    with pytest.raises(SystemExit) as err:
        parse_args(["--out", "x", flag, value])
    assert err.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("cls,bad", [(MaskConfig, {"block_size": 0}), (MaskConfig, {"activation_window": 0}),
                                     (HybridPeftConfig, {"lora_dropout": 1.0}), (ScanOrderConfig, {"every": -1}),
                                     (AdaptiveMambaConfig, {"pad_vocab_size_multiple": 0}),
                                     (OptimConfig, {"weight_decay": -0.1})])
def test_sections_built_in_code_check_their_declared_rules(cls: type, bad: dict) -> None:
    """A section built without the loader enforces the same `setting(check=...)` rule, named by class."""
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name}={value!r} is invalid: it must be"):
        cls(**bad)
