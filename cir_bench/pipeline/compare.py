"""``cir-bench compare``: Backward Search, its student, the embedding baselines and every
composed-image-retrieval baseline whose weights are present, on the same query sets, gallery,
self-match policy, tie-break and metric engine (the paper's Table 4)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from cir_bench.config import RunConfig
from cir_bench.models import pick_device
from cir_bench.pipeline.steps import cache_dir_for
from cir_bench.pipeline.run import run
from cir_bench.report.comparison import HEADLINE_TEMPLATE, write_report
from cir_bench.search.baseline import load_composer, release_composers

OWN_METHODS: list[Any] = ["random", "knn", "filtered_knn", {"method": "backward", "lam": 0.0}, "backward",
                          "student"]
COMPOSED = ["clip4cir", "pic2word", "searle", "searle-xl", "searle-oti", "lincir", "covr", "freedom", "basic"]
REFERENCES = ["clip-image", "clip-text", "clip-sum", "clip-product"]  # trivial references (template-independent)


def plan(baselines: Sequence[str], templates: Sequence[str], weights_dir: str | None, cache_dir: str | None,
         config_dir: str | None = None, options: dict[str, dict[str, Any]] | None = None
         ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Method entries for the baselines whose files are present, and the missing ones."""
    from cir_bench_baselines import BASELINES
    from cir_bench_baselines.base import MissingWeightsError, require, resolve_weights_root

    root, how = resolve_weights_root(weights_dir, config_dir)
    entries, missing = [], []
    for name in baselines:
        cls = BASELINES.get(name)
        opts = dict((options or {}).get(name, {}))
        files = cls.required_files(**opts)
        try:
            found = require(name, files, root, how)
        except MissingWeightsError as err:
            paths = [str((root / f.path).resolve()) for f in files if f.find(root) is None]
            missing.append({"baseline": name, "paths": paths, "message": str(err)})
            continue
        for f in files:  # a damaged file stops compare here, before any pipeline work
            f.check(found[f.path])
        for template in (templates if cls.text_source == "template" else [HEADLINE_TEMPLATE]):
            label = f"{name}[{template}]" if cls.text_source == "template" else name
            entries.append({"method": "baseline", "label": label, "baseline": name, "template": template,
                            "weights_dir": str(root), "cache_dir": cache_dir,
                            **({"options": opts} if opts else {})})
    return entries, missing


def run_compare(cfg: RunConfig, baselines: Sequence[str], templates: Sequence[str], weights_dir: str | None,
                progress: bool = True, log=print) -> Path:
    entries, missing = plan(baselines, templates, weights_dir, str(cache_dir_for(cfg)), cfg.baselines.weights_dir,
                            cfg.baselines.options)
    for m in missing:
        log(f"{m['baseline']}: weights missing: {', '.join(m['paths'])}")
    # build every adapter from its weights now: wrong keys or shapes fail before any training
    device = str(pick_device(cfg.device))
    for e in entries:
        load_composer(e["baseline"], e["weights_dir"], device, options=e.get("options"))
    # the λ curve compares Backward Search with itself: `run`'s business, not the baselines'
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"methods": list(OWN_METHODS) + entries,
                                                                      "lambda_curve": []})})
    try:
        out = run(cfg, progress=progress, log=log)
    finally:
        release_composers()
    (out / "compare.json").write_text(json.dumps({
        "baselines": list(baselines), "templates": list(templates), "headline_template": HEADLINE_TEMPLATE,
        "missing": missing}, indent=2))
    write_report([out], out)
    return out


