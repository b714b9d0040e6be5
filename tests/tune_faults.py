"""Fault injection for the Tune resume test (test scaffolding, not product code): a trainable
that records each trial it starts and fails one chosen trial while a marker file exists."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def faulty_trainable(marker: str, fail_trial: dict[str, Any], trace: str) -> Callable[[dict[str, Any]], None]:
    fail = json.dumps(fail_trial, sort_keys=True)

    def trial(config: dict[str, Any]) -> None:
        from cir_bench.tune.runner import run_trial

        if Path(marker).exists() and json.dumps(config["trial"], sort_keys=True) == fail:
            raise RuntimeError(f"injected failure: {marker} exists")
        with open(trace, "a", encoding="utf-8") as f:
            f.write(json.dumps(config["trial"], sort_keys=True) + "\n")
        run_trial(config)

    return trial
