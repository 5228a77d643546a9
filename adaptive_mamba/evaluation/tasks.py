"""The five tasks: prompts, stop sequences and scoring (model-independent parts).

Generative tasks score a dict {example id: [prediction, ...]} so that predictions of our model
and of any other system (`--predictions`) go through exactly the same code.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from .metrics import hotpot_scores, mean_pass_at_k, perplexities, rouge
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


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut the text at the earliest stop sequence (the stop itself is dropped)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


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
    """Corpus-level token/word/byte perplexity and bits per byte (document-level sums)."""
    counts = [word_and_byte_counts(t) for t in texts]
    return {**perplexities(sum(nll), sum(tokens), sum(c[0] for c in counts),
                           sum(c[1] for c in counts)),
            "documents": len(texts), "tokens": int(sum(tokens)),
            "words": sum(c[0] for c in counts), "bytes": sum(c[1] for c in counts)}


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


def score_cnn_dm(examples: Sequence[dict], predictions: dict[str, list[str]]) -> dict[str, float]:
    """ROUGE of the first prediction per article against its highlights (missing = empty)."""
    preds = [predictions.get(ex["id"], [""])[0].strip() for ex in examples]
    scores = rouge(preds, [ex["highlights"] for ex in examples])
    return {**scores, "examples": len(examples),
            "missing": sum(ex["id"] not in predictions for ex in examples)}


def score_hotpotqa(examples: Sequence[dict], predictions: dict[str, list[str]]) -> dict[str, float]:
    """EM/F1 of the first prediction per question, over all gold examples."""
    preds = {k: v[0] for k, v in predictions.items() if v}
    scores = hotpot_scores(preds, {ex["id"]: ex["answer"] for ex in examples})
    return {**scores, "examples": len(examples)}


def score_humaneval(examples: Sequence[dict], predictions: dict[str, list[str]],
                    ks: Sequence[int] = (1, 10, 100), timeout: float = 3.0,
                    workers: int = 2) -> dict:
    """Run every completion in the sandbox; unbiased pass@k over problems (k <= samples)."""
    missing = [ex["id"] for ex in examples if not predictions.get(ex["id"])]
    if missing:
        raise ValueError(f"humaneval: no completions for {len(missing)} problems (e.g. {missing[0]}); "
                         "every problem needs at least one sample")
    jobs = [(ex, c) for ex in examples for c in predictions[ex["id"]]]
    results = run_programs([humaneval_program(ex, c) for ex, c in jobs], timeout=timeout,
                           workers=workers, desc="humaneval sandbox")
    correct: dict[str, list[int]] = {ex["id"]: [0, 0] for ex in examples}
    statuses: dict[str, int] = {}
    for (ex, _), res in zip(jobs, results):
        correct[ex["id"]][0] += 1
        correct[ex["id"]][1] += res.passed
        statuses[res.status] = statuses.get(res.status, 0) + 1
    scores = mean_pass_at_k([tuple(v) for v in correct.values()], ks)
    return {**scores, "problems": len(examples), "samples": len(jobs), "statuses": statuses}
