"""The five tasks: prompts, stop sequences and scoring (model-independent parts).

Generative tasks score a dict {example id: [prediction, ...]} so that predictions of our model
and of any other system (`--predictions`) go through exactly the same code. Each scorer returns
the task's scores (every metric with a `<metric>_stderr` beside it) and one record per sample
(prompt, generation, reference, per-sample scores) for `--log-samples`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from .metrics import (
    LSUM_NOTE,
    ROUGE_TYPES,
    bootstrap_mean_stderr,
    bootstrap_stderr,
    hotpot_sample_scores,
    mean_stderr,
    pass_at_k_per_problem,
    perplexities,
    rouge_per_sample,
)
from .sandbox import run_programs

PERPLEXITY_TASKS = ("wikitext", "pg19")
GENERATIVE_TASKS = ("cnn_dm", "hotpotqa", "humaneval")
ALL_TASKS = PERPLEXITY_TASKS + GENERATIVE_TASKS

# Codex paper's stop sequences for HumanEval; a blank line ends a summary; a newline ends an answer.
STOP_SEQUENCES = {
    "cnn_dm": ["\n\n"],
    "hotpotqa": ["\n"],
    "humaneval": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
}
DEFAULT_MAX_NEW_TOKENS = {"cnn_dm": 128, "hotpotqa": 32, "humaneval": 512}


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (lm-evaluation-harness `wikitext_detokenizer`)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                 (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(a, b)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(a, b)
    return text


def scoring_text(task: str, text: str) -> str:
    """The text the model scores: WikiText detokenised as lm-eval does, books as they are."""
    return wikitext_detokenize(text) if task == "wikitext" else text


def word_and_byte_counts(text: str) -> tuple[int, int]:
    """Words (lm-eval: pieces of a split on whitespace runs) and UTF-8 bytes of the raw text."""
    return len(re.split(r"\s+", text)), len(text.encode("utf-8"))


def perplexity_summary(texts: Sequence[str], nll: Sequence[float],
                       tokens: Sequence[int]) -> dict[str, float]:
    """Corpus-level token/word/byte perplexity and bits per byte (document-level sums), each
    with a bootstrap standard error over documents."""
    words, nbytes = zip(*(word_and_byte_counts(t) for t in texts))
    out = perplexities(sum(nll), sum(tokens), sum(words), sum(nbytes))
    for key, unit in (("token_perplexity", tokens), ("word_perplexity", words),
                      ("byte_perplexity", nbytes)):
        out[f"{key}_stderr"] = bootstrap_stderr(lambda n, u: np.exp(n.sum(1) / u.sum(1)), nll, unit)
    out["bits_per_byte_stderr"] = bootstrap_stderr(lambda n, u: n.sum(1) / u.sum(1) / math.log(2),
                                                   nll, nbytes)
    return {**out, "documents": len(texts), "tokens": int(sum(tokens)),
            "words": sum(words), "bytes": sum(nbytes)}


def cnn_dm_prompt(article: str) -> str:
    """Zero-shot summarisation prompt (GPT-2's "TL;DR:" form)."""
    return f"{article.strip()}\n\nTL;DR:"


def hotpotqa_prompt(example: dict) -> str:
    """All context paragraphs (title + sentences), then the question and "Answer:"."""
    paragraphs = "\n\n".join(f"{title}: {''.join(sents).strip()}" for title, sents in example["context"])
    return f"{paragraphs}\n\nQuestion: {example['question']}\nAnswer:"


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that tests one completion: prompt + completion + tests + check call."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def aggregate(per_sample: Sequence[dict[str, float]], bootstrap: Sequence[str] = ()) -> dict:
    """Mean of every per-sample score with its standard error: a bootstrap for the keys in
    `bootstrap` (F1-type scores, as lm-eval), the sample standard error for the others."""
    out: dict = {}
    for key in per_sample[0]:
        values = [s[key] for s in per_sample]
        out[key] = float(np.mean(values))
        out[f"{key}_stderr"] = (bootstrap_mean_stderr if key in bootstrap else mean_stderr)(values)
    return out


def coverage(examples: Sequence[dict], predictions: dict[str, list]) -> dict:
    """How many gold examples have no prediction and how many predictions match no example."""
    ids = {ex["id"] for ex in examples}
    return {"examples": len(examples),
            "missing": sum(not predictions.get(ex["id"]) for ex in examples),
            "unknown": sum(k not in ids for k in predictions)}


def score_cnn_dm(examples: Sequence[dict], predictions: dict[str, list[str]]) -> tuple[dict, list[dict]]:
    """ROUGE of the first prediction per article against its highlights (missing = empty)."""
    preds = [(predictions.get(ex["id"]) or [""])[0].strip() for ex in examples]
    per = rouge_per_sample(preds, [ex["highlights"] for ex in examples])
    samples = [{"id": ex["id"], "prompt": cnn_dm_prompt(ex["article"]), "generation": p,
                "reference": ex["highlights"], "scores": s} for ex, p, s in zip(examples, preds, per)]
    return {**aggregate(per, ROUGE_TYPES), **coverage(examples, predictions), "note": LSUM_NOTE}, samples


def score_hotpotqa(examples: Sequence[dict], predictions: dict[str, list[str]],
                   supporting_facts: dict[str, list] | None = None) -> tuple[dict, list[dict]]:
    """EM/F1 of the first prediction per question over all gold examples (missing = 0); with
    `supporting_facts` ({id: [[title, sentence index], ...]}) also sp_* and joint_* scores."""
    per = [hotpot_sample_scores(
        (predictions.get(ex["id"]) or [None])[0], ex["answer"],
        None if supporting_facts is None else supporting_facts.get(ex["id"]),
        None if supporting_facts is None else ex["supporting_facts"]) for ex in examples]
    samples = [{"id": ex["id"], "prompt": hotpotqa_prompt(ex),
                "generation": (predictions.get(ex["id"]) or [None])[0], "reference": ex["answer"],
                **({"supporting_facts": supporting_facts.get(ex["id"]),
                    "reference_supporting_facts": ex["supporting_facts"]} if supporting_facts else {}),
                "scores": s} for ex, s in zip(examples, per)]
    f1_keys = ("f1", "sp_f1", "joint_f1")
    return {**aggregate(per, f1_keys), **coverage(examples, predictions)}, samples


def score_humaneval(examples: Sequence[dict], predictions: dict[str, list[str]],
                    ks: Sequence[int] | None = None, timeout: float = 3.0,
                    workers: int = 2) -> tuple[dict, list[dict]]:
    """Run every completion in the sandbox; unbiased pass@k over all problems (a problem with
    no completion scores 0). `ks=None`: 1, 10 and 100 as far as the samples allow; a requested
    k above the smallest sample count is left out with a warning."""
    attempted = [ex for ex in examples if predictions.get(ex["id"])]
    if not attempted:
        raise ValueError("humaneval: no completions for any problem")
    jobs = [(ex, c) for ex in attempted for c in predictions[ex["id"]]]
    results = run_programs([humaneval_program(ex, c) for ex, c in jobs], timeout=timeout,
                           workers=workers, desc="humaneval sandbox")
    counts = {ex["id"]: [0, 0] for ex in attempted}
    statuses: dict[str, int] = {}
    samples = []
    for (ex, completion), res in zip(jobs, results):
        counts[ex["id"]][0] += 1
        counts[ex["id"]][1] += res.passed
        statuses[res.status] = statuses.get(res.status, 0) + 1
        samples.append({"id": ex["id"], "prompt": ex["prompt"], "generation": completion,
                        "reference": ex["canonical_solution"], "status": res.status,
                        "returncode": res.returncode, "error": "" if res.passed else res.output,
                        "scores": {"passed": float(res.passed)}})
    n_min = min(n for n, _ in counts.values())
    scores: dict = {}
    skipped = [] if ks is None else [k for k in ks if k > n_min]
    for k in (1, 10, 100) if ks is None else ks:
        if k > n_min:
            continue
        per = list(pass_at_k_per_problem([tuple(counts[ex["id"]]) for ex in attempted], k))
        per += [0.0] * (len(examples) - len(attempted))
        scores[f"pass@{k}"] = float(np.mean(per))
        scores[f"pass@{k}_stderr"] = mean_stderr(per)
    if skipped:
        scores["warning"] = (f"pass@{','.join(map(str, skipped))} left out: k is larger than the "
                             f"{n_min} sample(s) per problem; generate more with --samples")
    return {**scores, **coverage(examples, predictions), "problems": len(examples),
            "samples": len(jobs), "statuses": statuses}, samples
