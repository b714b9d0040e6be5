"""The shipped Ray Tune experiment files (``cir-bench tune NAME``), installed with the
package so that ``cir-bench tune`` finds them from a wheel install, outside any checkout."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def names() -> list[str]:
    """The shipped experiments: quick, emoji, table3, lambda_sweep."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def resolve(name_or_path: str) -> Path:
    """An existing file path as given, else the shipped experiment of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if len(path.parts) == 1 and name in names():
        return Path(str(resources.files(__name__) / f"{name}.yaml"))
    raise FileNotFoundError(f"tune config not found: {name_or_path} (neither a file nor a shipped experiment: "
                            f"{', '.join(names())})")
