"""Real training runs: 2 CPU ranks under torchrun (gloo) with ZeRO-2/ZeRO-3 and all pillars, preemption and exact
resume, ZeRO-3 vs plain data parallel vs one process, fine-tuning a saved transformers-format model, bad input.

Every run goes through `launch/train.py` in a subprocess, exactly as a user starts it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["model.d_model=32", "model.n_layer=2", "train.seq_len=128", "train.batch_size=1", "logging.wandb=false",
        "logging.progress_bar=false", "masks.block_size=8", "eval.batches=1", "train.export_at_end=false"]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """Real shards of the default corpus (stdlib sources, SentencePiece 512), built once and cached."""
    from adaptive_mamba.data import DataPrepConfig, build_shards

    return build_shards(DataPrepConfig(out_dir=REPO / ".cache" / "test_train_data", source="stdlib",
                                       tokenizer="sentencepiece:512", max_bytes=1 << 20, val_fraction=0.05))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [PY, "launch/train.py", *args]
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_port()),
            "launch/train.py", *args]


def _port() -> int:
    from adaptive_mamba.training.distributed import free_port

    return free_port()


def train(nproc: int, args: list[str], timeout: float = 240, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(nproc, args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode} (expected {expect})\nSTDOUT\n{proc.stdout[-4000:]}\n"
                             f"STDERR\n{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def consistency(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "consistency.jsonl").read_text().splitlines()]


PILLARS = ["scan_order.every=2", "peft.start_step=3", "peft.every=2",
           "masks.learning_rate=0.2"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_pillars_stay_identical(tmp_path: Path, data_dir: Path, stage: int) -> None:
    out = tmp_path / f"zero{stage}"
    proc = train(2, [f"data.dir={data_dir}", f"train.output_dir={out}", f"train.zero_stage={stage}",
                     "train.max_steps=6", *TINY, *PILLARS])
    checks = consistency(out)
    tags = [c["tag"] for c in checks]
    assert "scan_order" in tags[0] and any("allocation" in t for t in tags) and tags[-1] == "end"
    for c in checks:       # gathered parameters, scan orders and allocations agree across ranks at every decision
        assert len(c["digests"]) == 2 and c["digests"][0] == c["digests"][1], c
    assert "PEFT allocation at step 3" in proc.stdout and "scan order refreshed at step 2" in proc.stdout
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert len(state["pillars"]["scan_decisions"]) == 2          # steps 2 and 4 (not at the last step)
    assert [h["step"] for h in state["pillars"]["allocation_history"]] == [3, 5]
    assert all(r["loss"] == r["loss"] for r in metrics(out).values())


@pytest.mark.slow
def test_sigterm_then_resume_is_exact(tmp_path: Path, data_dir: Path) -> None:
    common = [f"data.dir={data_dir}", "train.zero_stage=2", "train.max_steps=8", *TINY, *PILLARS]
    straight = tmp_path / "straight"
    train(2, [f"train.output_dir={straight}", *common])

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_cmd(2, [f"train.output_dir={resumed}", *common]), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (resumed / "metrics.jsonl").is_file() and len(metrics(resumed)) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)          # like a scheduler preempting the job: every process gets it
    log, _ = proc.communicate(timeout=120)
    assert "preempted at step" in log, log[-3000:]
    killed_at = max(metrics(resumed))
    assert killed_at < 8, "the run finished before the signal arrived"
    assert (resumed / "checkpoints" / f"step_{killed_at:08d}" / "MANIFEST.json").is_file()

    train(2, [f"train.output_dir={resumed}", "train.resume=auto", *common])
    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step]["loss"] == a[step]["loss"], (step, a[step], b[step])
    assert consistency(resumed)[-1]["digests"] == consistency(straight)[-1]["digests"]   # identical final parameters


@pytest.mark.slow
def test_zero_stages_and_one_process_agree_with_all_pillars_on(tmp_path: Path, data_dir: Path) -> None:
    """ZeRO-0, ZeRO-2, ZeRO-3 (2 ranks x batch 1) and one process (batch 1, 2 accumulation steps) read the same
    windows and draw the same mask noise (seeded per step and batch slot), with learned masks, scan-order refreshes
    and PEFT reallocation all on; the ZeRO-3 sparsity reports and evals in between must not shift the noise.
    Losses and gradient norms agree within 1e-4 over all 20 steps (scan-order refreshes at 4, 8, 12, 16 and
    reallocations at 6, 12, 18 make the same discrete choices everywhere: exact scan statistics and path costs), and
    the gradient norm is a real number at every step everywhere."""
    common = [f"data.dir={data_dir}", "train.max_steps=20", "train.verify_ranks=false", "eval.every=5", *TINY, *PILLARS,
              "scan_order.every=4", "peft.start_step=6", "peft.every=6"]
    runs = {"zero3": (2, ["train.zero_stage=3"]),
            "zero2": (2, ["train.zero_stage=2"]),
            "zero0": (2, ["train.zero_stage=0"]),
            "single": (1, ["train.zero_stage=0", "train.grad_accum_steps=2"])}
    curves, decisions = {}, {}
    for name, (nproc, extra) in runs.items():
        proc = train(nproc, [f"train.output_dir={tmp_path / name}", *common, *extra], timeout=480)
        assert "PEFT allocation at step 6" in proc.stdout and "scan order refreshed at step 4" in proc.stdout
        pillars = json.loads((tmp_path / name / "checkpoints" / "step_00000020" / "trainer.json").read_text())["pillars"]
        decisions[name] = ([d["perms"] for d in pillars["scan_decisions"]], pillars["allocation_history"])
        rows = metrics(tmp_path / name)
        assert sorted(rows) == list(range(1, 21))
        curves[name] = torch.tensor([[r["loss"], r["grad_norm"]] for r in rows.values()], dtype=torch.float64)
        assert torch.isfinite(curves[name]).all() and (curves[name][:, 1] > 0).all(), (name, curves[name])
    assert curves["single"][0, 0] > curves["single"][-1, 0]
    assert len(decisions["single"][0]) == 4 and len(decisions["single"][1]) == 3
    for name in ("zero0", "zero2", "zero3"):
        assert decisions[name][0] == decisions["single"][0], f"{name}: a different scan order"
        assert [h["kinds"] for h in decisions[name][1]] == [h["kinds"] for h in decisions["single"][1]], name
        torch.testing.assert_close(curves[name], curves["single"], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_finetune_from_transformers_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    """Fine-tune a saved transformers-format Mamba: base weights unchanged (up to the scan permutation, which is
    undone with the recorded order), only masks/adapters train, and the exported adapters reload."""
    from transformers import MambaConfig, MambaForCausalLM

    from adaptive_mamba import AdaptiveMambaForCausalLM
    from adaptive_mamba.pillars.persistence import load_adaptive_model

    vocab = json.loads((data_dir / "metadata.json").read_text())["tokenizer"]["vocab_size"]
    torch.manual_seed(0)
    hf = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=16,
                                      expand=2, conv_kernel=4))
    base_dir = tmp_path / "hf_base"
    hf.save_pretrained(base_dir)
    out = tmp_path / "ft"
    train(1, [f"data.dir={data_dir}", f"train.output_dir={out}", f"train.init_from={base_dir}", "train.max_steps=6",
              "train.zero_stage=2", *[a for a in TINY if a != "train.export_at_end=false"],
              "scan_order.every=2", "peft.start_step=3", "peft.every=0",
              "masks.learning_rate=0.2", "optim.lr=0.01"])
    base = AdaptiveMambaForCausalLM.from_pretrained(base_dir)
    tuned = load_adaptive_model(out / "export" / "adaptive")
    order = tuned.config.extra["scan_order"]
    assert any(o != sorted(o) for o in order), "the scan order was never changed"
    from adaptive_mamba.pillars.persistence import base_state_dict

    after = base_state_dict(tuned)
    inv = [torch.argsort(torch.tensor(o)) for o in order]
    changed = []
    for name, before in base.state_dict().items():
        value = after[name]
        if ".mixer." in name:   # undo the channel permutation of pillar 1 (an exact reparametrisation)
            layer = int(name.split(".")[1])
            p, d = inv[layer], len(inv[layer])
            if name.endswith(("A_log", "D", "conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias")):
                value = value.index_select(0, p)
            elif name.endswith("in_proj.weight"):
                value = value.index_select(0, torch.cat([p, p + d]))
            elif name.endswith(("x_proj.weight", "out_proj.weight")):
                value = value.index_select(1, p)
        if not torch.equal(value, before):
            changed.append(name)
    assert changed == [], f"base weights changed in fine-tune mode: {changed}"
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("mask_logits" in n or "lora_" in n or "ia3_" in n for n in trainable)
    assert (out / "export" / "adaptive" / "adapters").is_dir()
    ids = torch.randint(0, vocab, (1, 64))
    merged = AdaptiveMambaForCausalLM.from_pretrained(out / "export" / "merged").eval()
    tuned.eval()
    with torch.no_grad():   # the merged export computes what the adapted model computes in evaluation mode
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bad_inputs_fail_clearly(tmp_path: Path, data_dir: Path) -> None:
    """Five independent one-process cases, two at a time (each run is one single-threaded process on 2 cores)."""
    base = [f"data.dir={data_dir}", "train.max_steps=2", "train.zero_stage=0", *TINY]
    no_pillars = ["masks.enabled=false", "peft.enabled=false"]
    good, nan = tmp_path / "good", tmp_path / "nan"

    def corrupt_checkpoint() -> subprocess.CompletedProcess:
        train(1, [*base, f"train.output_dir={good}", "train.save_every=1", "train.max_steps=2", *no_pillars])
        victim = next((good / "checkpoints" / "step_00000002").rglob("*model_states.pt"))
        victim.write_bytes(victim.read_bytes()[:-100])
        return train(1, [*base, f"train.output_dir={good}", "train.resume=auto", "train.max_steps=3", *no_pillars],
                     expect=2)

    cases = {                         # the two-run case first, so that both workers stay busy
        "corrupt": corrupt_checkpoint,
        "typo": lambda: train(1, [*base, f"train.output_dir={tmp_path / 'a'}", "learning_rat=1"], expect=2),
        "no_shards": lambda: train(1, [*base, f"train.output_dir={tmp_path / 'b'}",
                                       f"data.dir={tmp_path / 'nothing'}"], expect=2),
        "too_long": lambda: train(1, [*base, f"train.output_dir={tmp_path / 'c'}", "data.packing=pad",
                                      "train.seq_len=10000000"], expect=2),
        "nan": lambda: train(1, [*base, f"train.output_dir={nan}", "optim.lr=1e30", "optim.grad_clip=0",
                                 "train.max_steps=6", *no_pillars, "train.save_every=1", "optim.warmup_steps=0"],
                             expect=1),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(case) for name, case in cases.items()}
        procs = {name: future.result() for name, future in futures.items()}
    assert "did you mean 'optim.lr'" in procs["typo"].stderr
    assert "holds no token shards" in procs["no_shards"].stderr and "python -m data_prep" in procs["no_shards"].stderr
    assert "larger than the longest document" in procs["too_long"].stderr and \
        "data.packing=pack" in procs["too_long"].stderr
    assert "does not match its manifest" in procs["corrupt"].stderr and "corrupt" in procs["corrupt"].stderr
    assert (good / "checkpoints" / "step_00000001" / "MANIFEST.json").is_file()      # the earlier one is intact

    assert "non-finite loss" in procs["nan"].stderr and "Last checkpoint: " in procs["nan"].stderr
    from adaptive_mamba.training.checkpointing import latest_checkpoint, verify_checkpoint

    good_ckpt = latest_checkpoint(nan)
    assert good_ckpt is not None and verify_checkpoint(good_ckpt)["step"] >= 1


def test_interrupted_save_keeps_last_good(tmp_path: Path) -> None:
    """A save that died midway leaves only a .tmp- folder: `latest` and resume=auto still find the good one."""
    from adaptive_mamba.training.checkpointing import (CheckpointCorruptError, MANIFEST, latest_checkpoint,
                                                       resolve_resume, verify_checkpoint)

    root = tmp_path / "checkpoints"
    good = root / "step_00000004"
    good.mkdir(parents=True)
    (good / "trainer.json").write_text(json.dumps({"step": 4}))
    import hashlib

    data = (good / "trainer.json").read_bytes()
    (good / MANIFEST).write_text(json.dumps({"step": 4, "files": {"trainer.json": {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
    (root / "latest").write_text("step_00000004\n")
    (root / ".tmp-step_00000008").mkdir()
    (root / ".tmp-step_00000008" / "trainer.json").write_text("{")
    (root / "step_00000006").mkdir()          # complete-looking name, but no manifest
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume("auto", tmp_path) == good
    assert verify_checkpoint(good)["step"] == 4
    with pytest.raises(CheckpointCorruptError, match="never completed"):
        verify_checkpoint(root / "step_00000006")
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "fresh") is None


@pytest.mark.slow
def test_long_sequence_16k_with_activation_checkpointing(tmp_path: Path, data_dir: Path) -> None:
    """seq_len 16384 trains on CPU with each block checkpointed (memory vs length: bench/bench_train_memory.py)."""
    out = tmp_path / "long"
    proc = train(1, [f"data.dir={data_dir}", f"train.output_dir={out}", "train.zero_stage=2",
                     "train.max_steps=2", *TINY, "train.seq_len=16384", "train.gradient_checkpointing=auto", "scan_order.every=1",
                     "peft.enabled=false"])
    assert "seq_len 16384, activation checkpointing on" in proc.stdout
    rows = metrics(out)
    assert sorted(rows) == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())


def _process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def sigterm_like_a_scheduler(proc: subprocess.Popen, out: Path, after_steps: int = 2) -> None:
    """Once `after_steps` steps are logged, SIGTERM every process of the run: W&B's service first (its loss used to
    make the next `run.log` raise), then the launcher and the ranks."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(metrics(out)) >= after_steps:
            break
        time.sleep(0.2)
    tree = _process_tree(proc.pid)
    services = [pid for pid in tree if _comm(pid).startswith("wandb-core")]
    if proc.poll() is not None or not services:
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the run ended before the signal, or has no wandb-core: {[(p, _comm(p)) for p in tree]}")
    for pid in services + [pid for pid in tree if pid not in services]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_with_wandb_saves_and_exits_99(tmp_path: Path, data_dir: Path, nproc: int) -> None:
    """scancel/preemption SIGTERMs every process, W&B's service included: the checkpoint is still written (before
    anything touches W&B), the exit status is 99 (through launch/run.py under torchrun), and the resumed run
    continues the same W&B run and finishes."""
    out = tmp_path / "run"
    args = [f"data.dir={data_dir}", f"train.output_dir={out}", "train.zero_stage=2",
            "train.max_steps=40", *TINY, "logging.wandb=true", "logging.wandb_mode=offline", *PILLARS]
    cmd = _cmd(nproc, args) if nproc == 1 else [PY, "launch/run.py", *_cmd(nproc, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sigterm_like_a_scheduler(proc, out)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 99, log[-5000:]
    assert "preempted at step" in log and "continuing without W&B" in log, log[-5000:]
    from adaptive_mamba.training.checkpointing import latest_checkpoint, verify_checkpoint

    checkpoint = latest_checkpoint(out)
    state = verify_checkpoint(checkpoint)                         # complete: every file matches the manifest
    assert state["step"] == max(metrics(out)) and len(list(checkpoint.glob("rank_*.pt"))) == nproc
    if nproc == 2:
        return
    resumed = [*args, "train.resume=auto", f"train.max_steps={state['step'] + 1}"]
    proc = train(1, resumed, timeout=480)
    assert f"resumed from {checkpoint} at step {state['step']}" in proc.stdout
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2      # one W&B run, continued

    # The history covers the whole run, each step once; a no-op rerun leaves the summary alone and says so.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, state["step"] + 2))
    summary_bytes = (out / "summary.json").read_bytes()
    summary = json.loads(summary_bytes)
    assert summary["steps"] == state["step"] + 1 and summary["tokens"] == sum(r["tokens"] for r in rows) > 0
    assert summary["train_loss_first"] == rows[0]["loss"] and summary["train_loss_last"] == rows[-1]["loss"]
    proc = train(1, resumed, timeout=480)
    assert "nothing to train; summary.json and the checkpoints are left as they are" in proc.stdout
    assert (out / "summary.json").read_bytes() == summary_bytes


def test_resume_history_keeps_each_step_once(tmp_path: Path) -> None:
    """Steps logged after the checkpoint a run resumes from are dropped, so the replayed steps are not duplicated."""
    from adaptive_mamba.training.monitoring import resume_history

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 8)))
    assert [r["step"] for r in resume_history(path, 4)] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert resume_history(path, 0) == [] and path.read_text() == ""
    assert resume_history(tmp_path / "absent.jsonl", 3) == [] and not (tmp_path / "absent.jsonl").exists()


def test_exit_records_combine_into_one_contract() -> None:
    """launch/run.py's rule: 1 beats 2 beats a missing record (when the launcher failed) beats 99 beats 0."""
    sys.path.insert(0, str(REPO))
    from launch.run import combine

    rec = lambda *codes: [{"rank": r, "code": c} for r, c in enumerate(codes)]  # noqa: E731
    assert combine(rec(0, 0), 0) == 0
    assert combine(rec(99, 99), 1) == 99                    # torchrun/deepspeed report 1 for the 99s
    assert combine(rec(2), 1, world_size=2) == 2            # bad input on one rank, the other was killed
    assert combine(rec(99), 1, world_size=2) == 1           # a rank died without a record
    assert combine(rec(99, 1), 1) == 1 and combine(rec(0, 2), 1) == 2
    assert combine([], 1) == 1 and combine([], 0) == 0      # a launcher without records: its own status
    assert combine(rec(0, 0), 1) == 1


@pytest.mark.parametrize("launcher", ["python", "torchrun", "deepspeed"])
def test_bad_input_exits_2_under_every_launcher(tmp_path: Path, launcher: str) -> None:
    """A bad value is exit 2 (not torchrun's or deepspeed's 1) with a one-line error, through launch/run.py."""
    args = ["launch/train.py", "data.source=stdlib", f"train.output_dir={tmp_path}", "peft.lora_r=0"]
    cmd = {"python": [PY, *args],
           "torchrun": [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()), *args],
           "deepspeed": [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()), *args]}
    proc = subprocess.run([PY, "launch/run.py", *cmd[launcher]], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error: command line: peft.lora_r=0 is invalid: it must be >= 1" in proc.stderr


def test_corrupt_shard_and_foreign_tokenizer_exit_2_before_training(tmp_path: Path, data_dir: Path,
                                                                    shared_data: Path) -> None:
    """4 overwritten bytes in a shard, or an init_from model whose tokenizer differs (same vocabulary size): a
    one-line error with exit 2 that names the problem, before the first step."""
    import shutil

    from adaptive_mamba import AdaptiveMambaForCausalLM
    from adaptive_mamba.config import AdaptiveMambaConfig
    from adaptive_mamba.tokenizer import train_sentencepiece

    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    base = ["train.zero_stage=0", "train.max_steps=2", *TINY]
    shard = sorted((data / "train").glob("*.bin"))[0].resolve()
    with shard.open("r+b") as f:
        f.seek(64)
        f.write(b"\x07\x00\x07\x00")
    out = tmp_path / "corrupt"
    proc = train(1, [f"data.dir={data}", f"train.output_dir={out}", *base], expect=2)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"shard {shard} does not match the sha256" in errors[0], proc.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists()

    book = (shared_data / "books").glob("*.txt").__next__().read_text()[:300_000]
    foreign = train_sentencepiece(book.split("\n\n"), tmp_path / "model", vocab_size=512)
    assert foreign.vocab_size == 512
    AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2, vocab_size=512)).save_pretrained(
        tmp_path / "model")
    proc = train(1, [f"data.dir={data_dir}", f"train.output_dir={tmp_path / 'ft'}", f"train.init_from={tmp_path / 'model'}",
                     *base], expect=2)
    assert f"train.init_from={tmp_path / 'model'} was made with a different tokenizer" in proc.stderr, proc.stderr[-3000:]


def test_resume_refuses_a_checkpoint_of_another_tokenizer(data_dir: Path) -> None:
    from adaptive_mamba.data import TokenShards
    from adaptive_mamba.tokenizer import TokenizerMismatchError
    from adaptive_mamba.training.config import load_train_config
    from adaptive_mamba.training.data_setup import check_tokenizer

    shards, cfg = TokenShards(data_dir, "train"), load_train_config(None, [f"data.dir={data_dir}"])
    own = check_tokenizer(shards, cfg, Path("ckpt"), {"tokenizer_sha256": shards.tokenizer().content_hash()})
    assert own == shards.tokenizer().content_hash()
    with pytest.raises(TokenizerMismatchError, match="the checkpoint ckpt was made with a different tokenizer"):
        check_tokenizer(shards, cfg, Path("ckpt"), {"tokenizer_sha256": "0" * 64})
