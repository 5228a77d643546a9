"""Command-line front end of the evaluation suite (run_suite.py)."""
