"""The research study: the design document's ablation, controls and grid, run through the real trainer.

`launch/study.py` is the command line; `Study` (driver.py) prepares, runs and reports; plan.py says
what runs, runner.py runs one, stats.py/report.py/plots.py turn results into answers.
"""
from adaptive_mamba.study.driver import Study, StudyOptions

__all__ = ["Study", "StudyOptions"]
