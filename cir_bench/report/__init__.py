"""Report stage: tables and plots built from written result files only (never from numbers
held in memory): report.html / report.md (html), the comparison tables of runs
(comparison), the Tune experiment's tables and plots (tune_tables), intervals and tests
(stats), the precision–context frontier (frontier)."""
from cir_bench.report.comparison import write_report
from cir_bench.report.html import ReportOptions, write_html_report
from cir_bench.report.inputs import ReportInputError, classify
from cir_bench.report.tune_tables import calibrated_table, write_tune_report

__all__ = ["ReportInputError", "ReportOptions", "calibrated_table", "classify", "write_html_report", "write_report",
           "write_tune_report"]
