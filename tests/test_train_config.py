"""TrainConfig parsing, DeepSpeed config resolution and the learning-rate schedule (no processes launched)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptive_mamba.training.config import TrainConfig, load_train_config, parse_overrides
from adaptive_mamba.training.engine import load_ds_config, zero_stage
from adaptive_mamba.training.trainer import lr_at

REPO = Path(__file__).resolve().parents[1]


def test_repo_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name == "study.yaml":           # the study's definition, tested in tests/test_study_stats.py
            continue
        cfg = load_train_config(path)
        assert Path(REPO / cfg.deepspeed_config).is_file(), path
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        precision = "bf16" if json.loads(path.read_text())["bf16"]["enabled"] is True else "fp32"
        ds = load_ds_config(TrainConfig(data_source="stdlib", deepspeed_config=str(path), precision=precision,
                                        batch_size=2, grad_accum_steps=3, grad_clip=0.5), world_size=4)
        assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
        assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] == (precision == "bf16")
        assert "optimizer" not in ds and not any(k.startswith("_") for k in ds)
        assert zero_stage(ds) in (0, 1, 2, 3)


def test_yaml_plus_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("d_model: 48\nlearning_rate: 0.01\ndata_source: stdlib\ninit_from: null\n")
    cfg = load_train_config(path, ["seq_len=4096", "learning_rate=3e-4", "wandb=false", "resume=auto",
                                   "gradient_checkpointing=auto", "vocab_size=none"])
    assert (cfg.d_model, cfg.seq_len, cfg.learning_rate, cfg.wandb, cfg.resume) == (48, 4096, 3e-4, False, "auto")
    assert cfg.use_gradient_checkpointing and cfg.vocab_size is None
    assert not load_train_config(None, ["data_source=stdlib", "seq_len=512"]).use_gradient_checkpointing
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"n_layers": 3, "data_dir": "x"}))
    assert load_train_config(json_path).n_layers == 3


def test_unknown_keys_suggest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'learning_rat'.*did you mean 'learning_rate'"):
        parse_overrides(["learning_rat=1e-3"])
    path = tmp_path / "c.yaml"
    path.write_text("data_source: stdlib\nscan_update_freq: 10\n")
    with pytest.raises(ValueError, match="did you mean 'scan_update_frequency'"):
        load_train_config(path)
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_overrides(["max_steps"])
    with pytest.raises(ValueError, match="cannot parse max_steps"):
        parse_overrides(["max_steps=ten"])


def test_invalid_values_and_missing_data() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(data_source="stdlib", precision="fp16")
    with pytest.raises(ValueError, match="seq_len=1"):
        TrainConfig(data_source="stdlib", seq_len=1)
    with pytest.raises(ValueError, match="set data_dir"):
        TrainConfig()
    with pytest.raises(ValueError, match="importance_source=activations needs masking=true"):
        TrainConfig(data_source="stdlib", masking=False, importance_source="activations")
    with pytest.raises(ValueError, match="no mask history before the first step"):
        TrainConfig(data_source="stdlib", init_from="m", importance_source="activations")
    with pytest.raises(ValueError, match="peft_mode=full trains every weight"):
        TrainConfig(data_source="stdlib", peft_mode="full", freeze_base=True)
    with pytest.raises(ValueError, match="peft_mode must be one of"):
        TrainConfig(data_source="stdlib", peft_mode="dora")
    assert TrainConfig(data_source="stdlib", masking=False).first_allocation_step == 100   # from scratch
    assert TrainConfig(data_source="stdlib", init_from="m").first_allocation_step == 0     # fine-tune: no flat start
    assert not TrainConfig(data_source="stdlib", init_from="m", peft_mode="full").freeze_base_weights


def test_ds_config_conflicts(tmp_path: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 disagrees"):
        load_ds_config(TrainConfig(data_source="stdlib", deepspeed_config=str(bad), batch_size=1), 1)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="defines an optimizer"):
        load_ds_config(TrainConfig(data_source="stdlib", deepspeed_config=str(bad)), 1)
    with pytest.raises(ValueError, match="bf16.enabled=True but precision=fp32"):
        load_ds_config(TrainConfig(data_source="stdlib", deepspeed_config=str(REPO / "ds_configs/zero2_bf16.json")), 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ds_config(TrainConfig(data_source="stdlib", deepspeed_config=str(tmp_path / "nope.json")), 1)


def test_lr_schedule() -> None:
    cfg = TrainConfig(data_source="stdlib", learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))       # cosine decays monotonically after warmup
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + __import__("math").cos(__import__("math").pi * 15 / 16)))
    assert lr_at(100, cfg, 20) == pytest.approx(0.1)
    assert lr_at(7, cfg.replace(lr_schedule="constant"), 20) == 1.0


@pytest.mark.parametrize("typed, expected", [
    ("mask_learning_rate=-1", "command line: mask_learning_rate=-1.0 is invalid: it must be > 0"),
    ("weight_decay=-0.1", "command line: weight_decay=-0.1 is invalid: it must be >= 0"),
    ("--peft-r=0", "command line: --peft-r=0 is invalid: it must be >= 1"),
    ("adam_beta2=1", "command line: adam_beta2=1.0 is invalid: it must be in [0, 1)"),
    ("eval_batches=0", "command line: eval_batches=0 is invalid: it must be >= 1"),
    ("masking_tau_final=0", "command line: masking_tau_final=0.0 is invalid: it must be > 0"),
])
def test_every_numeric_field_is_validated_by_the_name_typed(typed: str, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        load_train_config(None, ["data_source=stdlib", typed])
    assert str(err.value) == expected


def test_config_file_values_are_validated_by_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data_source: stdlib\npeft_r: 2.5\n")
    with pytest.raises(ValueError, match=rf"^config file {path}: peft_r=2.5 is invalid: it must be an integer$"):
        load_train_config(path)
    path.write_text("data_source: stdlib\nlearning_rate: fast\n")
    with pytest.raises(ValueError, match="learning_rate='fast' is invalid: it must be a number"):
        load_train_config(path)


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
