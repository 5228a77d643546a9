"""Evaluation metrics against references on real data: ROUGE, HotpotQA EM/F1, pass@k, HumanEval."""
from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest

from adaptive_mamba.evaluation import metrics, sources, tasks
from adaptive_mamba.evaluation.sandbox import SandboxError, check_isolation_available


def _sandbox_available() -> bool:
    try:
        check_isolation_available()
        return True
    except SandboxError:
        return False


needs_sandbox = pytest.mark.skipif(not _sandbox_available(), reason="sandbox needs bubblewrap on Linux")


def test_rouge_equals_rouge_score_called_directly(shared_data):
    from rouge_score import rouge_scorer

    rows = sources.load_cnn_dm(shared_data / "cnn_dailymail" / "test_raw_10.jsonl")
    # Lead-3 baseline, one sentence per line, as the prediction; highlights are newline-separated.
    preds = ["\n".join(r["article"].split(". ")[:3]) for r in rows]
    refs = [r["highlights"] for r in rows]
    ours = metrics.rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    for key in metrics.ROUGE_TYPES:
        expected = sum(d[key].fmeasure for d in direct) / len(direct)
        assert ours[key] == pytest.approx(expected, abs=1e-12), key
    assert 0.05 < ours["rouge1"] < 0.9
    # Lsum really uses sentences: one line per sentence differs from one single line.
    assert ours["rougeLsum"] != pytest.approx(ours["rougeL"])


def test_rouge_lsum_splits_unsplit_text_into_sentences(shared_data):
    rows = [r for _, r in sources.read_jsonl(shared_data / "cnn_dailymail" / "test_summeval_80_tokenized.jsonl")][:5]
    for r in rows:
        lines = metrics.split_sentences(r["highlights"]).split("\n")
        assert len(lines) >= 2 and all(line.strip() for line in lines)
    with pytest.raises(ValueError, match="one prediction per reference"):
        metrics.rouge(["a"], ["a", "b"])


def test_hotpotqa_gold_scores_one_and_known_wrong_answers(shared_data):
    rows = sources.load_hotpotqa(shared_data / "hotpotqa")
    gold = {r["id"]: r["answer"] for r in rows}
    assert len(gold) == 80
    perfect, _ = tasks.score_hotpotqa(rows, {k: [v] for k, v in gold.items()})
    assert (perfect["em"], perfect["f1"], perfect["missing"]) == (1.0, 1.0, 0)
    ids_by_answer: dict[str, list[str]] = {}
    for r in rows:
        ids_by_answer.setdefault(r["answer"], []).append(r["id"])
    # (gold, prediction, EM, F1) computed by hand with the official normalisation.
    cases = [
        ("World War II", "The Second World War", 0.0, 2 / 3),       # common {world, war}: P=R=2/3
        ("Mark Masons' Hall", "Masons Hall", 0.0, 0.8),           # P=1, R=2/3
        ("super-regional shopping mall", "a super regional mall", 0.0, 1 / 3),  # only "mall"
        ("22 November", "November 22, 1963", 0.0, 0.8),           # P=2/3, R=1
        ("no", "no way", 0.0, 0.0),                                # yes/no rule
        ("no", "No.", 1.0, 1.0),                                   # normalisation
    ]
    preds, changed = dict(gold), set()
    for answer, pred, em, f1 in cases:
        assert metrics.hotpot_exact_match(pred, answer) == em
        assert metrics.hotpot_f1(pred, answer) == pytest.approx(f1)
        key = ids_by_answer[answer].pop()  # a distinct example for each case
        preds[key] = pred
        changed.add(key)
    dropped = [k for k in gold if k not in changed][:2]
    for k in dropped:
        del preds[k]  # missing predictions count as wrong (averaged over all gold examples)
    scores, samples = tasks.score_hotpotqa(rows, {k: [v] for k, v in preds.items()})
    wrong_f1 = sum(1 - c[3] for c in cases)
    assert scores["em"] == pytest.approx((80 - 5 - 2) / 80)
    assert scores["f1"] == pytest.approx((80 - wrong_f1 - 2) / 80)
    assert scores["missing"] == 2 and scores["unknown"] == 0
    ems = [s["scores"]["em"] for s in samples]
    assert scores["em_stderr"] == pytest.approx(float(np.std(ems, ddof=1) / np.sqrt(80)))
    assert "sp_em" not in scores  # no supporting facts given


def test_hotpotqa_supporting_fact_and_joint_scores_follow_the_official_script(shared_data):
    rows = sources.load_hotpotqa(shared_data / "hotpotqa")[:3]
    gold_sp = [r["supporting_facts"] for r in rows]
    assert all(len(sp) >= 2 for sp in gold_sp)
    preds = {rows[0]["id"]: [rows[0]["answer"]],          # answer right, facts exact
             rows[1]["id"]: [rows[1]["answer"]],          # answer right, first fact + a wrong one
             rows[2]["id"]: ["something else entirely"]}  # answer wrong, facts exact
    facts = {rows[0]["id"]: gold_sp[0], rows[1]["id"]: [gold_sp[1][0], ["Nowhere", 9]],
             rows[2]["id"]: gold_sp[2]}
    scores, samples = tasks.score_hotpotqa(rows, preds, facts)
    # Example 2 by hand: tp=1, fp=1, fn=len-1 -> P=1/2, R=1/len.
    n = len(gold_sp[1])
    p, r = 1 / 2, 1 / n
    sp_f1_2 = 2 * p * r / (p + r)
    per = [s["scores"] for s in samples]
    assert per[0] == {"em": 1.0, "f1": 1.0, "sp_em": 1.0, "sp_f1": 1.0, "joint_em": 1.0, "joint_f1": 1.0}
    assert per[1]["sp_em"] == 0.0 and per[1]["sp_f1"] == pytest.approx(sp_f1_2)
    assert per[1]["joint_f1"] == pytest.approx(sp_f1_2)  # answer P=R=1: joint P=p, R=r
    assert per[2]["sp_em"] == 1.0 and per[2]["joint_em"] == 0.0 and per[2]["joint_f1"] == 0.0
    assert scores["sp_f1"] == pytest.approx((1 + sp_f1_2 + 1) / 3)
    assert scores["joint_em"] == pytest.approx(1 / 3)
    for key in ("em", "f1", "sp_em", "sp_f1", "joint_em", "joint_f1"):
        assert scores[f"{key}_stderr"] is not None


def test_standard_errors_match_lm_eval_estimators():
    rng = np.random.default_rng(0)
    values = rng.random(400)
    # Sample standard error of a mean: lm-eval's formula.
    expected = np.sqrt(((values - values.mean()) ** 2).sum() / (len(values) - 1)) / np.sqrt(len(values))
    assert metrics.mean_stderr(values) == pytest.approx(expected, rel=1e-12)
    # The bootstrap of a mean converges to std (ddof=0) / sqrt(n).
    boot = metrics.bootstrap_mean_stderr(values)
    assert boot == pytest.approx(values.std() / np.sqrt(len(values)), rel=0.08)
    assert metrics.bootstrap_mean_stderr(values) == boot  # seeded: reproducible
    assert metrics.mean_stderr([1.0]) is None


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 1, 10),
                                   (200, 17, 100), (5, 5, 2), (7, 2, 6)])
def test_pass_at_k_equals_closed_form(n, c, k):
    expected = 1.0 - comb(n - c, k) / comb(n, k)
    assert metrics.pass_at_k_per_problem([(n, c)], k)[0] == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="k <= n"):
        metrics.pass_at_k_per_problem([(3, 1)], 5)
    assert list(metrics.pass_at_k_per_problem([(2, 1), (3, 0)], 2)) == [1.0, 0.0]


def test_humaneval_program():
    problem = sources.load_humaneval(None)[0]
    program = tasks.humaneval_program(problem, problem["canonical_solution"])
    assert program.startswith(problem["prompt"]) and program.endswith("check(has_close_elements)\n")


def test_wikitext_pages_and_counts(shared_data):
    rows = sources.load_wikitext(shared_data / "wikitext-2")
    assert len(rows) == 62  # the README's article count
    assert all(r["text"].lstrip().startswith("= ") for r in rows)
    raw = (shared_data / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert "\n".join([" "] + [r["text"] for r in rows]) == raw  # nothing lost but the blank start
    words, nbytes = tasks.word_and_byte_counts(" a  b\nc ")
    assert (words, nbytes) == (5, 8)  # lm-eval splits on whitespace runs (empty ends count)
    assert tasks.wikitext_detokenize(" The @-@ star , 1 @,@ 000 ( big ) ") == " The-star, 1,000 (big) "


@pytest.mark.slow
@needs_sandbox
def test_humaneval_canonical_solutions_pass_and_return_none_fails():
    problems = sources.load_humaneval(None)
    assert len(problems) == 164
    good, _ = tasks.score_humaneval(problems, {p["id"]: [p["canonical_solution"]] for p in problems})
    assert good["pass@1"] == 1.0 and good["samples"] == 164 and good["pass@1_stderr"] == 0.0
    assert "pass@10" not in good and "warning" not in good  # default ks: silently up to samples
    # Two samples each: the canonical one and `return None`: pass@1 = 0.5, pass@2 = 1.
    mixed, _ = tasks.score_humaneval(
        problems[:10], {p["id"]: [p["canonical_solution"], "    return None\n"] for p in problems[:10]},
        ks=(1, 2, 10))
    assert mixed["pass@1"] == pytest.approx(0.5) and mixed["pass@2"] == 1.0
    assert "pass@10" not in mixed and "pass@10 left out" in mixed["warning"]
    bad, samples = tasks.score_humaneval(problems, {p["id"]: ["    return None\n"] for p in problems})
    assert bad["pass@1"] == 0.0 and bad["statuses"] == {"failed": 164}
    assert all(s["status"] == "failed" and "Traceback" in s["error"] for s in samples)


@needs_sandbox
def test_humaneval_problems_without_completions_count_as_failed():
    problems = sources.load_humaneval(None)[:3]
    scores, _ = tasks.score_humaneval(problems, {p["id"]: [p["canonical_solution"]] for p in problems[:2]})
    assert scores["pass@1"] == pytest.approx(2 / 3) and scores["missing"] == 1


def test_missing_data_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data hotpotqa=PATH"):
        sources.load_hotpotqa(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        sources.load_task_data("squad", None)
    (tmp_path / "x.jsonl").write_text(json.dumps({"id": "1", "article": "a", "highlights": "b"}) + "\n")
    assert sources.load_cnn_dm(tmp_path / "x.jsonl") == [{"id": "1", "article": "a", "highlights": "b"}]
