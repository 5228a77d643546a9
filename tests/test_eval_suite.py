"""End to end: `eval/run_suite.py` on all five tasks with a small real model and the real data."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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
           "--device", "cpu", "--out", str(out), "--wandb"]
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
    assert Path(pg19["position_plot"]).read_text().startswith("<svg")

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
    assert hot["f1"] == pytest.approx(metrics.hotpot_scores(hot_preds, gold)["f1"])

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


def test_cli_errors_name_the_fix(tmp_path, shared_data):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"task": "hotpotqa", "id": "x", "prediction": "y"}) + "\n")
    with pytest.raises(ValueError, match="cannot score wikitext"):
        run_suite.main(["--predictions", str(preds), "--tasks", "wikitext,hotpotqa",
                        "--data-dir", str(shared_data), "--out", str(tmp_path / "r.json")])
    with pytest.raises(ValueError, match="no predictions for cnn_dm"):
        run_suite.main(["--predictions", str(preds), "--tasks", "cnn_dm",
                        "--data-dir", str(shared_data), "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="--data expects TASK=PATH"):
        run_suite.main(["--predictions", str(preds), "--data", "squad=/x", "--out", str(tmp_path / "r.json")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="needs task, id and prediction"):
        run_suite.main(["--predictions", str(bad), "--out", str(tmp_path / "r.json")])
    # Scoring a partial file: missing gold examples count as wrong.
    res = run_suite.main(["--predictions", str(preds), "--data-dir", str(shared_data), "--limit", "4",
                          "--out", str(tmp_path / "r.json")])
    assert res["tasks"]["hotpotqa"]["scores"] == {"em": 0.0, "f1": 0.0, "missing": 4.0, "examples": 4}
