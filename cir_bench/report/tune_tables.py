"""Tables and plots of a Tune experiment, built from its tidy results file."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

CONFIG_COLUMNS = ("model.backbone", "model.finetune", "model.embed_dim", "model.pretrained")
# columns of the Table 3 layout: the query set, prefixed by the task when the grid has one


def _config_label(df: pd.DataFrame) -> pd.Series:
    cols = [c for c in CONFIG_COLUMNS if c in df.columns]
    if not cols:
        return pd.Series(["default"] * len(df), index=df.index)
    return df[cols].astype(str).agg(" / ".join, axis=1)


def calibrated_table(df: pd.DataFrame, metric: str = "precision_at_10") -> str:
    """Table 3 layout: rows = configuration, columns = query set + average, at the calibrated
    λ, with the mean ± std of the achieved calibration metric as a footnote."""
    cal = df[df["kind"] == "calibrated"].copy()
    if cal.empty:
        return "(no calibrated results)\n"
    cal["config"] = _config_label(cal)
    if "task" in cal:
        cal["query_set"] = cal["task"].astype(str)
    ok = cal[cal["cal_status"] != "unreachable"]
    table = ok.pivot_table(index="config", columns="query_set", values=metric, aggfunc="mean")
    table["average"] = table.mean(axis=1)
    lines = [f"| configuration | {' | '.join(table.columns)} |", "|---" * (len(table.columns) + 1) + "|"]
    for cfg, row in table.iterrows():
        lines.append(f"| {cfg} | " + " | ".join(f"{v:.3f}" for v in row.to_numpy()) + " |")
    unreachable = cal[cal["cal_status"] == "unreachable"]
    for _, row in unreachable.iterrows():
        lines.append(f"| {row['config']} | {row['query_set']}: unreachable ({row['cal_message']}) |")
    achieved = ok["cal_value"].astype(float)
    metric_name = ok["cal_metric"].iloc[0] if len(ok) else "metric"
    lines.append("")
    lines.append(f"{metric} at the calibrated λ (test queries). Achieved {metric_name} on the calibration "
                 f"queries: mean {achieved.mean():.4f}, std {achieved.std(ddof=0):.4f} "
                 f"(target {ok['cal_target'].iloc[0] if len(ok) else '?'}).")
    return "\n".join(lines) + "\n"


def write_tune_report(df: pd.DataFrame, out: Path, metric: str = "precision_at_10") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "tune_results.parquet", out / "tune_results.csv", out / "table.md"]
    df.to_parquet(paths[0], index=False)
    df.to_csv(paths[1], index=False)
    tidy = pd.read_parquet(paths[0])  # everything below is built from the file
    paths[2].write_text(calibrated_table(tidy, metric))
    sweep = tidy[tidy["kind"] == "sweep"].copy()
    if not sweep.empty:
        sweep["config"] = _config_label(sweep)
        sweep["lam_plot"] = sweep["lam"].where(sweep["lam"] > 0, sweep.loc[sweep["lam"] > 0, "lam"].min() / 2
                                               if (sweep["lam"] > 0).any() else 1e-4)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, col in zip(axes, (metric, "mts_at_10")):
            if col in sweep:
                sns.lineplot(data=sweep, x="lam_plot", y=col, hue="config", style="query_set", marker="o", ax=ax)
                ax.set_xscale("log")
                ax.set_xlabel("λ (λ = 0 drawn at the left edge)")
                ax.set_title(f"{col} vs λ")
        fig.tight_layout()
        paths.append(out / "lambda_curves.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    cal = tidy[(tidy["kind"] == "calibrated") & tidy[metric].notna()] if metric in tidy else pd.DataFrame()
    if not cal.empty:
        cal = cal.assign(config=_config_label(cal))
        fig, ax = plt.subplots(figsize=(7, 4))
        sns.barplot(data=cal, x="config", y=metric, hue="query_set", ax=ax)
        ax.set_title(f"{metric} at the calibrated λ")
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        paths.append(out / "calibrated.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
