"""Every shell command in README.md and docs/*.md stays true.

Commands are the lines of ```bash / ```sh / ```console blocks (`\\` continuations joined, comments dropped). Each
one is either run, in a short form, in a scratch checkout (RUNS: the command exactly as documented plus arguments
that shorten it, e.g. `train.max_steps=2`), or checked statically: the script, make target, config file, pip extra
or pytest path it names exists, every `--flag` it passes appears in that program's `--help`, and the config
overrides it gives load through the real config loader. A command no rule covers fails the test, listed. Relative
links in the same pages must resolve (file and heading anchor).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "console", "shell"}
README_MAX_BYTES = 12_000

# Documented commands that run here, in a short form: the extra arguments appended to the command as written.
# Order matters (the evaluation and the fine-tune use the demo run's export and shards).
RUNS: dict[str, list[str]] = {
    "python launch/train.py --config configs/demo.yaml train.max_steps=20 masks.block_size=16":
        ["train.max_steps=2", "data.max_mb=0.3", "logging.wandb=false", "logging.progress_bar=false"],
    "python eval/run_suite.py --model runs/demo/export/merged --data-dir ../shared/data --tasks wikitext,hotpotqa "
    "--limit 10 --out runs/demo/eval.json": ["--limit", "1", "--max-new-tokens", "4"],
    "python launch/train.py --config configs/demo.yaml train.init_from=runs/demo/export/merged data.dir=runs/demo/data "
    "peft.start_step=0 train.output_dir=runs/demo_finetune":
        ["train.max_steps=2", "data.max_mb=0.3", "logging.wandb=false", "logging.progress_bar=false"],
    "python -m data_prep --source folder:../shared/data/books --tokenizer hf:../shared/data/tokenizers/gpt-neox-20b "
    "--out runs/data/books --val-fraction 0.2": ["--max-docs", "5"],
    "TRAIN_DRY_RUN=1 SLURM_JOB_ID=1 SLURM_JOB_NODELIST='gpu[01-04]' SLURM_JOB_NUM_NODES=4 SLURM_NTASKS=32 "
    "SLURM_TASKS_PER_NODE='8(x4)' SLURM_GPUS_ON_NODE=8 bash slurm/train.sh --config configs/demo.yaml": [],
}

@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}: {self.text}"


def doc_commands() -> list[Command]:
    """Shell commands of the fenced blocks, one per logical line, without comments, whitespace collapsed."""
    commands = []
    for path in DOC_FILES:
        lang, pending, start = None, "", 0
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fence = re.match(r"\s*```(\w*)", line)
            if fence:
                lang = None if lang is not None else fence.group(1)
                continue
            body = re.sub(r"^\$ ", "", line.strip()) if lang == "console" else line.strip()
            if lang not in SHELL_LANGS or not pending and (not body or body.startswith("#")):
                continue
            start = start if pending else number
            if body.endswith("\\"):
                pending += body[:-1] + " "
                continue
            text = re.sub(r"\s+#\s.*$", "", pending + body)       # a trailing comment
            commands.append(Command(path, start, " ".join(text.split())))
            pending = ""
    return commands


# ------------------------------------------------------------------------------------------------ static checks
_HELP: dict[tuple[str, ...], Future] = {}
_HELP_LOCK = threading.Lock()
_CONFIG_LOCK = threading.Lock()


def help_text(argv: tuple[str, ...]) -> str:
    """`ARGV --help`, run once per program even when several threads ask for it at the same time."""
    with _HELP_LOCK:
        future, owner = _HELP.get(argv), False
        if future is None:
            future, owner = _HELP.setdefault(argv, Future()), True
    if owner:
        try:
            future.set_result(subprocess.run([*argv, "--help"], cwd=REPO_ROOT, env=_env(), capture_output=True,
                                             text=True, timeout=300))
        except BaseException as err:        # a timeout: the threads waiting on this program get it too
            future.set_exception(err)
            raise
    proc = future.result()
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def check_flags(argv: tuple[str, ...], args: list[str], what: str) -> None:
    """Every --flag (and -x) in args appears in the program's --help."""
    text = help_text(argv)
    for arg in args:
        if re.match(r"^--?[A-Za-z]", arg):
            flag = arg.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                raise AssertionError(f"{flag} is not in `{' '.join(argv)} --help`")


def check_train_args(args: list[str], what: str) -> None:
    """launch/train.py's arguments: the config file exists and loads with the overrides."""
    from adaptive_mamba.training.config import load_train_config

    config, overrides, rest = None, [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--config":
            config = REPO_ROOT / rest.pop(0)
            assert config.is_file(), f"{what}: config {config} does not exist"
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise AssertionError(f"{what}: launch/train.py takes --config FILE and key=value, not {arg!r}")
    with _CONFIG_LOCK, warnings.catch_warnings():     # warning filters are process-wide: one thread at a time
        warnings.simplefilter("error")          # a deprecated key in the docs is an error
        load_train_config(config, overrides)


def check_script(script: str, args: list[str], what: str) -> None:
    """A Python script of this repo with its arguments."""
    assert (REPO_ROOT / script).is_file(), f"{what}: {script} does not exist"
    if script == "launch/train.py":
        check_train_args(args, what)
    elif script == "launch/run.py":
        check_command(args, {}, what)
    else:
        check_flags((PY, script), args, what)


def check_python(args: list[str], what: str) -> None:
    if args[:2] == ["-m", "pytest"]:
        check_pytest(args[2:], what)
    elif args[:2] == ["-m", "pip"]:
        check_pip(args[2:], what)
    elif args[0] == "-m":
        check_flags((PY, "-m", args[1]), args[2:], what)
    else:
        check_script(args[0], args[1:], what)


def check_pytest(args: list[str], what: str) -> None:
    markers = set(re.findall(r'^\s+"(\w+):', _pyproject_section("tool.pytest.ini_options"), re.M))
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "-m":
            names = set(re.findall(r"\w+", rest.pop(0))) - {"not", "and", "or"}
            assert names <= markers, f"{what}: unknown marker(s) {names - markers}"
        elif not arg.startswith("-"):
            assert (REPO_ROOT / arg.split("::")[0]).exists(), f"{what}: {arg} does not exist"


def check_pip(args: list[str], what: str) -> None:
    assert args[0] == "install", f"{what}: only pip install is documented"
    extras = set(re.findall(r"^([\w-]+) = \[", _pyproject_section("project.optional-dependencies"), re.M))
    for arg in args[1:]:
        match = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        if match:
            assert set(match[1].split(",")) <= extras, f"{what}: unknown extra in {arg} (pyproject: {sorted(extras)})"
        elif not arg.startswith("-"):
            raise AssertionError(f"{what}: pip installs this project only (.[extra]), not {arg!r}")


def check_make(args: list[str], env: dict[str, str], what: str) -> None:
    targets = [a for a in args if "=" not in a]
    variables = dict(a.split("=", 1) for a in args if "=" in a)
    proc = subprocess.run(["make", "-n", *args], cwd=REPO_ROOT, env={**_env(), **env}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"{what}: make -n failed:\n{proc.stderr}"
    for script, rest in re.findall(r"\S*python3? (bench/\S+\.py)(.*)$", proc.stdout, re.M):
        check_script(script, shlex.split(rest), what)     # the benchmarks a target runs take the flags it passes
    if "train" in targets:        # make train runs launch/train.py --config configs/demo.yaml $(TRAIN_ARGS)
        check_train_args(["--config", "configs/demo.yaml", *shlex.split(variables.get("TRAIN_ARGS", ""))], what)


def check_launcher(argv: tuple[str, ...], args: list[str], what: str) -> None:
    """torchrun / deepspeed: launcher options, then a script and its arguments."""
    script = next(i for i, a in enumerate(args) if a.endswith(".py"))
    check_flags(argv, args[:script], what)
    check_script(args[script], args[script + 1:], what)


def check_slurm(args: list[str], what: str) -> None:
    """sbatch [Slurm's own options] slurm/X.sh ARGS, or bash slurm/X.sh ARGS."""
    script = next(i for i, a in enumerate(args) if a.endswith(".sh"))
    assert (REPO_ROOT / args[script]).is_file(), f"{what}: {args[script]} does not exist"
    target = {"slurm/train.sh": "launch/train.py", "slurm/study.sh": "launch/study.py"}[args[script]]
    check_script(target, args[script + 1:], what)


PROGRAMS = ("python", "python3", ".venv/bin/python", "pip", "make", "torchrun", "deepspeed", "sbatch", "bash",
            "lm_eval")


def check_command(tokens: list[str], env: dict[str, str], what: str) -> None:
    program, args = tokens[0], tokens[1:]
    if program in ("python", "python3", ".venv/bin/python"):
        check_python(args, what)
    elif program == "pip":
        check_pip(args, what)
    elif program == "make":
        check_make(args, env, what)
    elif program == "torchrun":
        check_launcher((PY, "-m", "torch.distributed.run"), args, what)
    elif program == "deepspeed":
        check_launcher((str(BIN / "deepspeed"),), args, what)
    elif program in ("sbatch", "bash"):
        check_slurm(args, what)
    elif program == "lm_eval":     # without a subcommand, lm-eval inserts `run`
        command = args.pop(0) if args and not args[0].startswith("-") else "run"
        check_flags((str(BIN / "lm_eval"), command), args, what)
    else:
        raise AssertionError(f"no rule checks {program} commands")


def split_env(text: str) -> tuple[dict[str, str], list[str]]:
    tokens = shlex.split(text, comments=True)
    env = {}
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    return env, tokens


# ------------------------------------------------------------------------------------------------ runs
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    return env


def _pyproject_section(name: str) -> str:
    """The text of one [section] of pyproject.toml (tomllib is 3.11+; the project supports 3.10)."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    return re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)


def scratch_checkout(root: Path, shared_data: Path) -> Path:
    """A folder that looks like a checkout (links to the repo's top-level entries, ../shared/data) so that the
    documented relative paths hold and everything a command writes lands in the temporary folder."""
    work = root / "checkout"
    work.mkdir()
    for entry in REPO_ROOT.iterdir():
        if entry.name not in (".git", "runs", ".cache"):
            (work / entry.name).symlink_to(entry)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(shared_data)
    return work


def run_argv(tokens: list[str]) -> list[str]:
    program, args = tokens[0], tokens[1:]
    if program in ("python", "python3"):
        return [PY, *args]
    return [program, *args]


# ------------------------------------------------------------------------------------------------ tests
def test_readme_is_short_and_links_resolve() -> None:
    assert (REPO_ROOT / "README.md").stat().st_size < README_MAX_BYTES, "README.md grew past 12 KB: move detail to docs/"
    broken = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO_ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(REPO_ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_command_is_known() -> None:
    """Each documented command has a rule (run or static), and each short form belongs to a documented command."""
    commands = doc_commands()
    assert len(commands) > 20, "the command extraction found almost nothing"
    documented = {c.text for c in commands}
    stale = [c for c in RUNS if c not in documented]
    assert not stale, "RUNS entries that no page documents any more:\n" + "\n".join(stale)
    unchecked = []
    for command in commands:
        env, tokens = split_env(command.text)
        if tokens[0] not in PROGRAMS:
            unchecked.append(command.where())
    assert not unchecked, "commands no rule checks (add a static rule or a short form in RUNS):\n" + \
        "\n".join(unchecked)


@pytest.mark.slow
def test_commands_statically() -> None:
    """Scripts, targets, files, flags and config keys named by every documented command exist. The commands are
    checked concurrently (one thread per core): the time goes into `--help` subprocesses that wait on imports."""
    from adaptive_mamba.training.config import load_train_config  # noqa: F401  (imported once, not by each thread)

    def failure(command: Command) -> str | None:
        env, tokens = split_env(command.text)
        try:
            check_command(tokens, env, command.where())
        except (AssertionError, ValueError, FileNotFoundError, StopIteration, KeyError) as err:
            return f"{command.where()}\n    {type(err).__name__}: {err}"
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(failure, doc_commands()) if f is not None]
    assert not failures, "documented commands that do not hold:\n" + "\n".join(failures)


@pytest.mark.slow
def test_runnable_commands_run(tmp_path: Path, shared_data: Path) -> None:
    """The documented commands that fit a CPU run, shortened, in order: train, evaluate its export, fine-tune it,
    prepare data, the Slurm dry run."""
    work = scratch_checkout(tmp_path, shared_data)
    commands = {c.text: c for c in doc_commands()}
    for text, extra in RUNS.items():
        env, tokens = split_env(text)
        proc = subprocess.run(run_argv(tokens + extra), cwd=work, env={**_env(), **env}, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{commands[text].where()}\nexit {proc.returncode}:\n" \
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (work / "runs/demo/export/merged/config.json").is_file()
    assert (work / "runs/demo/eval.json").is_file()
    finetune = json.loads((work / "runs/demo_finetune/summary.json").read_text())
    assert finetune["steps"] == 2 and finetune["trainable_pct"] < 100, "init_from must freeze the base weights"
    assert (work / "runs/data/books/metadata.json").is_file()
