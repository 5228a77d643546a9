"""The GPU check's measurements (called by bench/gpu_check.sh; `--cpu-smoke` runs every part on tiny CPU shapes).

    python bench/gpu_check.py --out gpu_check.json [--cpu-smoke] [--parts scan,train,throughput,longest]

- scan: mamba-ssm's CUDA selective scan through our dispatch vs the float64 reference, forward and gradients.
- train: 50 optimizer steps of the 130M shape (d_model 768, 24 layers), all pillars on, one process under NCCL,
  ZeRO-2 bf16 (launch/train.py under torchrun, as a user runs it); the loss must fall and the exported checkpoint,
  reloaded on the CPU in fp32, must give the GPU's bf16 logits.
- throughput: tokens/s and peak memory of a training step (forward, backward, AdamW) for mamba-ssm's
  MambaLMHeadModel (transformers' MambaForCausalLM where mamba-ssm is absent: the CPU smoke run), ours with the
  pillars off and ours with all pillars on,
  at L = 2048 and 8192; the ratios are ours / plain and pillars-on / pillars-off.
- longest: the longest single training sequence (batch 1, activation checkpointing, all pillars, bf16) whose
  forward and backward fit, found by doubling from 64k tokens and then one bisection step.

Every part writes its fields into the JSON (updated after each part), an error is recorded as the part's "error"
and the next part still runs; the exit status is 1 when any part failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = ("scan", "train", "throughput", "longest")


def shapes(smoke: bool) -> dict[str, Any]:
    """Model and run sizes: the 130M shape on a GPU, a tiny one for the CPU smoke run."""
    if smoke:
        return dict(d_model=32, n_layers=2, vocab=512, train_steps=4, train_seq=128, lengths=[256, 512],
                    longest_start=1024, longest_cap=4096, timed_steps=1, scan_len=64)
    return dict(d_model=768, n_layers=24, vocab=50280, train_steps=50, train_seq=2048, lengths=[2048, 8192],
                longest_start=1 << 16, longest_cap=1 << 22, timed_steps=5, scan_len=4096)


# ------------------------------------------------------------------------------------------------ (c) scan
def check_scan(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """Max abs error of out, last state and every gradient against the float64 reference (random inputs)."""
    from adaptive_mamba.ops import selective_scan, selective_scan_ref

    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 256, 16, size["scan_len"]
    inputs = dict(u=torch.randn(b, d, length, generator=g), delta=0.5 * torch.randn(b, d, length, generator=g),
                  A=-torch.rand(d, n, generator=g) - 0.1, B=torch.randn(b, n, length, generator=g),
                  C=torch.randn(b, n, length, generator=g), D=torch.randn(d, generator=g),
                  z=torch.randn(b, d, length, generator=g), delta_bias=torch.rand(d, generator=g))

    def run(fn: Callable, dev: torch.device, dtype: torch.dtype):
        leaves = {k: v.to(dev, dtype).requires_grad_(True) for k, v in inputs.items()}
        out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
        out.float().pow(2).mean().backward()
        return {"out": out, "last_state": last, **{f"d{k}": v.grad for k, v in leaves.items()}}

    ref = run(selective_scan_ref, torch.device("cpu"), torch.float64)
    got = run(selective_scan, device, torch.float32)
    errors = {k: float((got[k].detach().cpu().double() - ref[k].detach()).abs().max()
                       / ref[k].detach().abs().max().clamp_min(1e-12)) for k in ref}
    worst = max(errors.values())
    return {"kernel": "selective_scan_cuda" if device.type == "cuda" else "cpu dispatch",
            "length": length, "max_rel_error": errors, "worst_rel_error": worst, "passed": worst < 1e-3}


# ----------------------------------------------------------------------------------------------- (d) train
def check_training(device: torch.device, size: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """launch/train.py under torchrun (1 process: NCCL on a GPU, gloo on the CPU), then reload on the CPU."""
    from adaptive_mamba.data import DataPrepConfig, build_shards
    from adaptive_mamba.pillars.persistence import load_adaptive_model

    smoke = device.type == "cpu"
    data = build_shards(DataPrepConfig(out_dir=workdir / "data", source="stdlib", tokenizer="sentencepiece:512",
                                       max_bytes=(1 if smoke else 8) << 20, val_fraction=0.02))
    out = workdir / "train"
    steps = size["train_steps"]
    precision = ["train.precision=fp32" if smoke else "train.precision=bf16", "train.zero_stage=2"]
    args = [f"data.dir={data}", f"train.output_dir={out}", f"model.d_model={size['d_model']}", f"model.n_layer={size['n_layers']}",
            f"train.seq_len={size['train_seq']}", "train.batch_size=1", f"train.max_steps={steps}", "optim.lr=1e-3",
            "optim.warmup_steps=5", *precision, f"scan_order.every={max(2, steps // 3)}",
            f"peft.start_step={max(3, steps // 2)}", f"peft.every={max(2, steps // 4)}",
            "masks.learning_rate=0.05", "eval.batches=1", "logging.wandb=false", "logging.progress_bar=false", "train.resume=none",
            f"logging.every={max(1, steps // 5)}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "launch/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    (workdir / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"training exited {proc.returncode}; last lines:\n{(proc.stdout + proc.stderr)[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    k = max(1, len(rows) // 5)
    first, last = sum(r["ce"] for r in rows[:k]) / k, sum(r["ce"] for r in rows[-k:]) / k

    # reload the exported checkpoint on the CPU (fp32) and on the training device (fp32 and bf16): same logits
    ids = torch.randint(0, 256, (1, min(512, size["train_seq"])), generator=torch.Generator().manual_seed(0))
    reload: dict[str, Any] = {}
    with torch.no_grad():
        cpu_model = load_adaptive_model(out / "export" / "adaptive").eval()
        cpu_logits = cpu_model(ids).logits.float()
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
            model = load_adaptive_model(out / "export" / "adaptive", dtype=dtype, device=device).eval()
            logits = model(ids.to(device)).logits.float().cpu()
            name = str(dtype).removeprefix("torch.")
            reload[name] = {"rel_error": float((logits - cpu_logits).norm() / cpu_logits.norm()), "tolerance": tol,
                            "argmax_agreement": float((logits.argmax(-1) == cpu_logits.argmax(-1)).float().mean())}
            reload[name]["passed"] = reload[name]["rel_error"] < tol
    return {"backend": "nccl" if device.type == "cuda" else "gloo", "world_size": 1, "steps": len(rows),
            "shape": {"d_model": size["d_model"], "n_layers": size["n_layers"], "seq_len": size["train_seq"],
                      "vocab": cpu_model.config.vocab_size},
            "precision": "bf16" if device.type == "cuda" else "fp32", "zero_stage": 2,
            "ce_first": first, "ce_last": last, "loss_fell": last < first, "seconds": round(time.perf_counter() - t0, 1),
            "tokens_per_s": summary.get("tokens_per_s"), "peak_memory_mb": summary.get("peak_memory_mb"),
            "reload_vs_cpu": reload,
            "passed": last < first and len(rows) == steps and all(r["passed"] for r in reload.values())}


# ---------------------------------------------------------------------------------------- (e), (f) models
def pillar_model(size: dict[str, Any], pillars: bool, checkpointing: bool) -> tuple[torch.nn.Module, Callable]:
    """Ours at the check's shape: plain, or with masks, a hybrid LoRA/IA3 allocation and the scan-statistics
    collector (what training runs with); returns (model, regulariser)."""
    from adaptive_mamba import AdaptiveMambaForCausalLM
    from adaptive_mamba.pillars.hybrid_peft import decide_allocation, module_importance
    from adaptive_mamba.training.adaptation import PillarController
    from adaptive_mamba.training.config import load_train_config
    from adaptive_mamba.training.distributed import DistContext

    cfg = load_train_config(None, [
        f"model.d_model={size['d_model']}", f"model.n_layer={size['n_layers']}", f"masks.enabled={pillars}",
        f"peft.enabled={pillars}", "data.source=stdlib",             # required by TrainConfig; no data is read here
        f"scan_order.enabled={pillars}", f"scan_order.every={1 if pillars else 0}",
        f"train.gradient_checkpointing={checkpointing}"])
    ctl = PillarController(cfg, DistContext(), total_steps=1000)
    base = lambda: AdaptiveMambaForCausalLM(cfg.model_config(size["vocab"]))   # noqa: E731
    if pillars:
        masked = ctl.build_structure(base())
        ids = torch.randint(0, size["vocab"], (1, 256))           # a throughput check: importance from any batch
        importance = module_importance(masked, ctl.peft_cfg, [(ids, ids)])
        ctl.allocation = decide_allocation(importance, ctl.peft_cfg, step=0).to_dict()
    model = ctl.build_structure(base())
    ctl.attach(model)
    return model, ctl.regularizer


def plain_mamba(size: dict[str, Any]) -> tuple[str, torch.nn.Module, Callable]:
    """The baseline at the same shape: mamba-ssm's own MambaLMHeadModel (its fused kernels) when mamba-ssm imports,
    else transformers' MambaForCausalLM (CPU smoke). Returns (name, model, loss function)."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        from transformers import MambaConfig, MambaForCausalLM

        model = MambaForCausalLM(MambaConfig(hidden_size=size["d_model"], num_hidden_layers=size["n_layers"],
                                             vocab_size=size["vocab"], state_size=16, expand=2, conv_kernel=4))
        return "transformers MambaForCausalLM", model, lambda m, ids: m(ids, labels=ids).loss
    model = MambaLMHeadModel(SsmConfig(d_model=size["d_model"], n_layer=size["n_layers"], vocab_size=size["vocab"],
                                       ssm_cfg={"layer": "Mamba1"}))
    return "mamba_ssm MambaLMHeadModel", model, lambda m, ids: F.cross_entropy(
        m(ids).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train_steps(model: torch.nn.Module, loss_fn: Callable, length: int, steps: int, device: torch.device,
                vocab: int) -> dict[str, float]:
    """Time `steps` training steps (after one warm-up step) of batch 1 at `length`; tokens/s and peak memory."""
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (1, length), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.type == "cuda" else None
    return {"tokens_per_s": round(steps * length / seconds, 1), "peak_memory_mb": peak}


def ours_loss(regularizer: Callable) -> Callable:
    return lambda model, ids: model(ids, labels=ids, return_logits=False).loss + regularizer(model)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_throughput(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for length in size["lengths"]:
        row: dict[str, Any] = {}
        rows["plain_model"], model, loss_fn = plain_mamba(size)
        row["plain_mamba"] = train_steps(model, loss_fn, length, size["timed_steps"], device, size["vocab"])
        del model
        _free(device)
        for name, pillars in (("ours_pillars_off", False), ("ours_pillars_on", True)):
            model, reg = pillar_model(size, pillars, checkpointing=False)
            row[name] = train_steps(model, ours_loss(reg), length, size["timed_steps"], device, size["vocab"])
            del model
            _free(device)
        plain, off, on = (row[k]["tokens_per_s"] for k in ("plain_mamba", "ours_pillars_off", "ours_pillars_on"))
        row["ours_off_vs_plain"] = round(off / plain, 3)
        row["pillars_on_vs_off"] = round(on / off, 3)
        rows[f"L{length}"] = row
    return rows


def find_longest(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """Doubling from `longest_start` until a step runs out of memory (or `longest_cap`), then one bisection."""
    model, reg = pillar_model(size, pillars=True, checkpointing=True)
    loss_fn = ours_loss(reg)
    tried: dict[int, Any] = {}

    def fits(length: int) -> bool:
        try:
            tried[length] = train_steps(model, loss_fn, length, 1, device, size["vocab"])
            return True
        except torch.OutOfMemoryError:
            tried[length] = "out of memory"
            return False
        finally:
            for p in model.parameters():
                p.grad = None
            _free(device)

    best, length = 0, size["longest_start"]
    while length <= size["longest_cap"] and fits(length):
        best, length = length, length * 2
    if 0 < best < size["longest_cap"] and fits(best + best // 2):
        best = best + best // 2
    return {"longest_tokens": best, "activation_checkpointing": True, "pillars": "all", "batch": 1,
            "cap": size["longest_cap"], "tried": {str(k): v for k, v in tried.items()}}


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--cpu-smoke", action="store_true", help="every part on tiny CPU shapes (checks the script)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--workdir", type=Path, default=REPO / ".cache" / "gpu_check")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --cpu-smoke to check the script "
              "on tiny CPU shapes", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    from adaptive_mamba.ops import cuda_kernel_available   # after the checks above: they answer at once

    if device.type == "cuda" and not cuda_kernel_available():
        print("gpu_check: mamba-ssm's selective_scan_cuda is not importable: build it first (bench/gpu_check.sh "
              "does, from the tarballs in .gpu/)", file=sys.stderr)
        return 2
    size = shapes(args.cpu_smoke)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke run)",
        "cuda": torch.version.cuda, "smoke": args.cpu_smoke,
        "shape": {"d_model": size["d_model"], "n_layers": size["n_layers"], "vocab": size["vocab"]}}
    jobs = {"scan": lambda: check_scan(device, size),
            "train": lambda: check_training(device, size, args.workdir),
            "throughput": lambda: measure_throughput(device, size),
            "longest": lambda: find_longest(device, size)}
    failed = False
    for part in parts:
        t0 = time.perf_counter()
        try:
            result[part] = jobs[part]()
            failed |= result[part].get("passed") is False
        except Exception as err:            # record and go on: one broken part must not hide the others
            result[part] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            failed = True
        result[part]["seconds"] = round(time.perf_counter() - t0, 1)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"gpu_check: {part} done in {result[part]['seconds']} s"
              + (f" -- ERROR {result[part]['error']}" if "error" in result[part] else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
