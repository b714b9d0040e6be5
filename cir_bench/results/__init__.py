"""Results stage: the run files that sit between computing and reporting."""
from cir_bench.results.run_files import RESULT_FILES, check_run_files, format_metrics_table, git_revision, \
    package_versions, write_run

__all__ = ["RESULT_FILES", "check_run_files", "format_metrics_table", "git_revision", "package_versions",
           "write_run"]
