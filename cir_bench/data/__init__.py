"""Dataset registry. Adding a dataset = one module + one ``DATASETS.register`` line here."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cir_bench.data.base import BadImageError, Dataset, Item, Property, UnknownLabelError
from cir_bench.registry import Registry

#: name -> factory(root, options, cache_dir) -> Dataset
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


@DATASETS.register("synthart")
def _synthart(root: str | None, options: dict[str, Any], cache_dir: str | Path | None) -> Dataset:
    from cir_bench.data.synthart import SynthArt

    if root is not None:
        raise ValueError("dataset 'synthart' is generated, it takes no --root")
    return SynthArt.load(cache_dir=cache_dir, verbose=True, **options)


@DATASETS.register("csv")
def _csv(root: str | None, options: dict[str, Any], cache_dir: str | Path | None) -> Dataset:
    from cir_bench.data.csv_folder import load

    return load(root, options)


@DATASETS.register("cub")
def _cub(root: str | None, options: dict[str, Any], cache_dir: str | Path | None) -> Dataset:
    from cir_bench.data.cub import load

    return load(root, options)


@DATASETS.register("apy")
def _apy(root: str | None, options: dict[str, Any], cache_dir: str | Path | None) -> Dataset:
    from cir_bench.data.apy import load

    return load(root, options)


@DATASETS.register("wikiart")
def _wikiart(root: str | None, options: dict[str, Any], cache_dir: str | Path | None) -> Dataset:
    from cir_bench.data.wikiart import load

    return load(root, options)


def get_dataset(name: str, root: str | None = None, options: dict[str, Any] | None = None,
                cache_dir: str | Path | None = None) -> Dataset:
    return DATASETS.get(name)(root, dict(options or {}), cache_dir)


__all__ = ["DATASETS", "get_dataset", "Dataset", "Item", "Property", "BadImageError", "UnknownLabelError"]
