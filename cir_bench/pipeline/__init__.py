"""The ``run`` driver: the cached chain dataset -> train -> embed -> index (``prepare``), the
whole run on one dataset (``run``) and the baseline comparison (``compare``)."""
from cir_bench.pipeline.steps import Prepared, TrainedModel, cache_dir_for, distil_or_load, embed, load_dataset, \
    make_queries, prepare, query_sets, teacher, teacher_label, train_or_load
from cir_bench.pipeline.run import MethodSpec, method_specs, run

__all__ = ["MethodSpec", "Prepared", "TrainedModel", "cache_dir_for", "distil_or_load", "embed", "load_dataset",
           "make_queries", "method_specs", "prepare", "query_sets", "run", "teacher", "teacher_label", "train_or_load"]
