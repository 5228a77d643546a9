"""Bad input to `eval/run_suite.py` gives one clear line and exit status 2; partial predictions
are counted and shown, not silently scored as zeros."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_mamba.evaluation import sources
from adaptive_mamba.evaluation.sources import InputError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))
import run_suite


def fails_with(capsys, argv: list[str], message: str) -> str:
    """Run the CLI, expect exit status 2 and a single `error:` line containing `message`."""
    with pytest.raises(SystemExit) as exc:
        run_suite.main(argv)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    return err[0]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines,message", [
    (['{"task": "hotpotqa", "id": "a", "prediction": "x"}', '{"task": "hotpotqa", "id": "b",'],
     "p.jsonl:2: not valid JSON"),
    (['[1, 2]'], "p.jsonl:1: expected a JSON object, got list"),
    (['{"task": "hotpotqa", "id": "a", "prediction": null}'], "p.jsonl:1: prediction must be a string, got NoneType"),
    (['{"task": "hotpotqa", "id": "a", "prediction": ["x"]}'], "prediction must be a string, got list"),
    (['{"task": "hotpotqa", "id": "a", "prediction": 3}'], "prediction must be a string, got int"),
    (['{"task": "hotpotqa", "id": 1.5, "prediction": "x"}'], "id must be a string, got float"),
    (['{"task": "squad", "id": "a", "prediction": "x"}'], "task 'squad' cannot be scored"),
    (['{"question": "q"}'], "p.jsonl:1: a prediction line needs task, id and prediction"),
    (['{"task": "hotpotqa", "id": "a", "prediction": "x", "supporting_facts": [["t", "0"]]}'],
     "supporting_facts must be a list of [title, sentence index] pairs"),
    ([], "is empty"),
    (["", "   "], "is empty"),
])
def test_malformed_predictions_files(tmp_path, shared_data, capsys, lines, message):
    preds = write(tmp_path / "p.jsonl", lines)
    fails_with(capsys, ["--predictions", str(preds), "--data-dir", str(shared_data),
                        "--out", str(tmp_path / "r.json")], message)
    assert not (tmp_path / "r.json").exists()


def test_option_errors(tmp_path, shared_data, capsys):
    preds = write(tmp_path / "p.jsonl", ['{"task": "hotpotqa", "id": "x", "prediction": "y"}'])
    base = ["--predictions", str(preds), "--data-dir", str(shared_data), "--out", str(tmp_path / "r.json")]
    fails_with(capsys, base + ["--tasks", "wikitext,hotpotqa"], "cannot score wikitext")
    fails_with(capsys, base + ["--tasks", "cnn_dm"], "no predictions for cnn_dm")
    fails_with(capsys, base + ["--tasks", "squad"], "unknown task(s) squad")
    fails_with(capsys, base + ["--data", "squad=/x"], "--data expects TASK=PATH")
    fails_with(capsys, base + ["--k", "1,ten"], "--k expects comma-separated integers")
    fails_with(capsys, ["--predictions", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r.json")],
               "no such file")


def test_wrong_format_data_files(tmp_path, shared_data, capsys):
    preds = write(tmp_path / "p.jsonl", ['{"task": "hotpotqa", "id": "x", "prediction": "y"}',
                                         '{"task": "cnn_dm", "id": "x", "prediction": "y"}'])
    out = ["--out", str(tmp_path / "r.json")]
    cnn = shared_data / "cnn_dailymail" / "test_raw_10.jsonl"
    fails_with(capsys, ["--predictions", str(preds), "--tasks", "hotpotqa", "--data", f"hotpotqa={cnn}", *out],
               f"{cnn}:1: missing key '_id'")
    hotpot = shared_data / "hotpotqa" / "hotpot_dev_distractor_sample80.jsonl"
    fails_with(capsys, ["--predictions", str(preds), "--tasks", "cnn_dm", "--data", f"cnn_dm={hotpot}", *out],
               "missing key 'id'")
    bad = write(tmp_path / "bad.jsonl", ['{"id": "x", "article": "a", "highlights": ["b"]}'])
    fails_with(capsys, ["--predictions", str(preds), "--tasks", "cnn_dm", "--data", f"cnn_dm={bad}", *out],
               "bad.jsonl:1: 'highlights' must be a string, got list")
    empty = write(tmp_path / "empty.jsonl", [])
    fails_with(capsys, ["--predictions", str(preds), "--tasks", "cnn_dm", "--data", f"cnn_dm={empty}", *out],
               "no examples in the file")
    with pytest.raises(InputError, match="no ' = Title = ' article headings"):
        sources.load_wikitext(cnn)
    with pytest.raises(InputError, match="not UTF-8"):
        sources.load_books((lambda p: (p.write_bytes(b"\xff\xfe\x00bad"), p)[1])(tmp_path / "book.txt"))


def test_missing_and_unknown_ids_are_counted_and_shown(tmp_path, shared_data, capsys):
    gold = sources.load_hotpotqa(shared_data / "hotpotqa")[:3]
    preds = write(tmp_path / "p.jsonl", [
        json.dumps({"task": "hotpotqa", "id": gold[0]["id"], "prediction": gold[0]["answer"]}),
        json.dumps({"task": "hotpotqa", "id": gold[1]["id"], "prediction": gold[1]["answer"]}),
        json.dumps({"task": "hotpotqa", "id": "not-a-hotpot-id", "prediction": "x"})])
    res = run_suite.main(["--predictions", str(preds), "--data-dir", str(shared_data), "--limit", "3",
                          "--out", str(tmp_path / "r.json")])
    scores = res["tasks"]["hotpotqa"]["scores"]
    assert (scores["em"], scores["missing"], scores["unknown"]) == (pytest.approx(2 / 3), 1, 1)
    captured = capsys.readouterr()
    assert "| hotpotqa | em | 0.6667 |" in captured.out and "| 3 | 1 | 1 |" in captured.out
    assert "1 of 3 examples have no prediction" in captured.err
    assert "1 predictions have ids that match no gold example" in captured.err


def test_hub_fallback_offline_says_how_to_pass_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for task in ("pg19", "hotpotqa", "cnn_dm", "wikitext"):
        with pytest.raises(InputError, match=rf"^{task}: could not load .* pass --data-dir DIR .* --data {task}=PATH"):
            sources.load_task_data(task, None)


def test_without_a_sandbox_the_other_tasks_run_and_humaneval_is_skipped(tmp_path, shared_data):
    gold = sources.load_hotpotqa(shared_data / "hotpotqa")[:2]
    preds = write(tmp_path / "p.jsonl", [
        *(json.dumps({"task": "hotpotqa", "id": ex["id"], "prediction": ex["answer"]}) for ex in gold),
        json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"})])
    out = tmp_path / "r.json"
    # No bubblewrap on PATH: the sandbox cannot run here.
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "run_suite.py"), "--predictions", str(preds),
                           "--data-dir", str(shared_data), "--limit", "2", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": str(tmp_path / "empty")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "humaneval skipped, the other tasks run: bubblewrap (`bwrap`) is not installed" in proc.stderr
    results = json.loads(out.read_text())
    assert results["tasks"]["hotpotqa"]["scores"]["em"] == 1.0 and "humaneval" not in results["tasks"]
    assert "apt-get install -y bubblewrap" in results["skipped"]["humaneval"]
    assert "| humaneval | skipped |" in proc.stdout
