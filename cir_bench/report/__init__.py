"""Report stage: tables and plots built from written result files only (never from numbers
held in memory): the comparison tables of runs (comparison), the Tune experiment's tables and
plots (tune_tables)."""
from cir_bench.report.comparison import write_report
from cir_bench.report.tune_tables import calibrated_table, write_tune_report

__all__ = ["calibrated_table", "write_report", "write_tune_report"]
