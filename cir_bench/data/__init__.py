"""Dataset registry. Adding a dataset = one module + one ``DATASETS.register`` line here."""
from __future__ import annotations

import importlib
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


@DATASETS.register("emoji")
def _emoji(root: str | None, options: dict[str, Any], cache_dir: str | Path | None) -> Dataset:
    from cir_bench.data.emoji import load

    return load(root, options, cache_dir)


def _files_loader(module: str) -> Callable[..., Dataset]:
    """A dataset read from files: ``cir_bench.data.<module>.load(root, options)``, imported
    on first use so that listing datasets imports nothing heavy."""

    def factory(root: str | None, options: dict[str, Any], cache_dir: str | Path | None) -> Dataset:
        return importlib.import_module(f"cir_bench.data.{module}").load(root, options)

    return factory


_MODULES = {"csv": "csv_folder", "cub": "cub", "apy": "apy", "wikiart": "wikiart", "domains": "domains"}
for _name, _module in _MODULES.items():
    DATASETS.register(_name)(_files_loader(_module))


def check_dataset_options(name: str, options: dict[str, Any]) -> None:
    """Fail on an unknown or badly typed option of dataset ``name`` before any work."""
    DATASETS.get(name)
    if name == "synthart":
        from cir_bench.data.synthart import check_options

        check_options(options)
    elif name == "emoji":
        from cir_bench.data.emoji import check

        check(dict(options))
    else:
        importlib.import_module(f"cir_bench.data.{_MODULES[name]}").check(dict(options))


def get_dataset(name: str, root: str | None = None, options: dict[str, Any] | None = None,
                cache_dir: str | Path | None = None) -> Dataset:
    return DATASETS.get(name)(root, dict(options or {}), cache_dir)


__all__ = ["DATASETS", "check_dataset_options", "get_dataset", "Dataset", "Item", "Property", "BadImageError",
           "UnknownLabelError"]
