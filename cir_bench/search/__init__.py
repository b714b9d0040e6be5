"""Search-method registry: name -> factory(**params) -> SearchMethod."""
from __future__ import annotations

from typing import Any, Callable

from cir_bench.search.backward import BackwardSearch
from cir_bench.search.base import Ranking, SearchContext, SearchMethod
from cir_bench.search.baseline import BaselineSearch
from cir_bench.search.filtered_knn import FilteredKNN, OracleFilteredKNN
from cir_bench.search.knn import KNNSearch
from cir_bench.search.random_search import RandomSearch
from cir_bench.search.soft_filtered_knn import SoftFilteredKNN
from cir_bench.search.student import StudentSearch
from cir_bench.registry import Registry

METHODS: Registry[Callable[..., SearchMethod]] = Registry("search method")
METHODS.register("random")(RandomSearch)
METHODS.register("knn")(KNNSearch)
METHODS.register("backward")(BackwardSearch)
METHODS.register("filtered_knn")(FilteredKNN)
METHODS.register("oracle_filtered_knn")(OracleFilteredKNN)
METHODS.register("soft_filtered_knn")(SoftFilteredKNN)
METHODS.register("student")(StudentSearch)
METHODS.register("baseline")(BaselineSearch)  # CoIR adapters of baselines/ (cir-bench compare)


def get_method(name: str, **params: Any) -> SearchMethod:
    return METHODS.get(name)(**params)


__all__ = ["METHODS", "get_method", "Ranking", "SearchContext", "SearchMethod"]
