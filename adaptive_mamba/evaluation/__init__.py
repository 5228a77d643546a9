"""Evaluation suite: WikiText/PG-19 perplexity (rolling and recurrent), CNN/DailyMail ROUGE,
HotpotQA EM/F1 and sandboxed HumanEval pass@k. The CLI is `python eval/run_suite.py`."""
from .suite import EvalConfig, run_suite, score_prediction_file

__all__ = ["EvalConfig", "run_suite", "score_prediction_file"]
