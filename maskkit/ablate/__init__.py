"""Paired masking studies (`maskkit ablate`): study files, their runs, and reports with verdicts in plain words.

One module per concept: `study` (the TOML file -> a validated `Study`), `options` (`maskkit pretrain`
options checked against `RunConfig`), `plan` (every (arm, seed) run and its commands), `select` (grids
chosen on the validation split), `calibrate` (equal wall time / equal FLOPs budgets), `runner` (local
processes, resumable), `cache` (its records, read strictly), `processes` (children that die with it), `stats` (paired differences and intervals), `report` (tables), `chart` and
`gallery` (the PNGs).
"""

from maskkit.ablate.report import Report, build_report, markdown, write_report
from maskkit.ablate.runner import LAUNCHERS, RunFailed, StudyRunner, StudyStopped
from maskkit.ablate.stats import Comparison, compare, describe, paired_interval
from maskkit.ablate.study import Study, StudyError, load_study, parse_study

__all__ = [
    "LAUNCHERS", "Comparison", "Report", "RunFailed", "Study", "StudyError", "StudyRunner", "StudyStopped",
    "build_report", "compare",
    "describe", "load_study", "markdown", "paired_interval", "parse_study", "write_report",
]  # fmt: skip
