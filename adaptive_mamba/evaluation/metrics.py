"""Metrics: ROUGE (google's rouge-score), HotpotQA EM/F1 (official normalisation), pass@k.

All scores are in [0, 1]. Each function scores plain strings, so predictions of any system can be
compared on the same code.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@lru_cache(maxsize=1)
def _sentence_splitter():
    # Punkt with its default parameters: a real sentence splitter that needs no downloaded data.
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


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (stemmer on, Lsum on newline-separated sentences)."""
    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions but {len(references)} references; "
                         "pass one prediction per reference")
    if not predictions:
        raise ValueError("rouge: no predictions to score")
    scorer = _rouge_scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(split_sentences(ref), split_sentences(pred))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}


def normalize_answer(text: str) -> str:
    """HotpotQA's official normalisation: lowercase, no punctuation/articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def hotpot_exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def hotpot_f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised strings; yes/no/noanswer must match exactly (official rule)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def hotpot_scores(predictions: dict[str, str], gold: dict[str, str]) -> dict[str, float]:
    """EM and F1 averaged over all gold examples; a missing prediction scores 0 (official)."""
    if not gold:
        raise ValueError("hotpot_scores: no gold answers")
    em = sum(hotpot_exact_match(predictions[k], g) for k, g in gold.items() if k in predictions)
    f1 = sum(hotpot_f1(predictions[k], g) for k, g in gold.items() if k in predictions)
    return {"em": em / len(gold), "f1": f1 / len(gold),
            "missing": float(sum(k not in predictions for k in gold))}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), in the numerically stable product form."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems given (n samples, c correct) each; only k <= min n reported."""
    n_min = min(n for n, _ in counts)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
            for k in ks if k <= n_min}


def perplexities(nll_sum: float, n_tokens: int, n_words: int, n_bytes: int) -> dict[str, float]:
    """Token, word and byte perplexity and bits per byte from a summed negative log-likelihood."""
    return {"token_perplexity": math.exp(nll_sum / n_tokens),
            "word_perplexity": math.exp(nll_sum / n_words),
            "byte_perplexity": math.exp(nll_sum / n_bytes),
            "bits_per_byte": nll_sum / n_bytes / math.log(2)}
