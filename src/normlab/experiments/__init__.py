"""The experiment harness: declared experiments (TOML), parallel sweeps, the results store, reports.

Data flows one way: experiment file -> validated :class:`Experiment` -> runs -> worker processes
-> :class:`Store` -> :func:`build_report`. A report is rebuilt from the store alone.
"""

from .report import build_report, export_tensorboard, summarize
from .spec import Experiment, SpecError, bundled, load, override
from .store import Store, StoreError
from .sweep import run_experiment

__all__ = ["Experiment", "SpecError", "Store", "StoreError", "build_report", "export_tensorboard", "bundled", "load", "override", "run_experiment",
           "summarize"]
