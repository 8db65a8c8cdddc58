"""Experiments: real offline tasks, a config, a runner, a SQLite result store and a report.

Submodules import torch-heavy or plotting code lazily; import what you use::

    from adaprec.experiments.config import load_config
    from adaprec.experiments.runner import run_experiment
    from adaprec.experiments.report import write_report
"""
