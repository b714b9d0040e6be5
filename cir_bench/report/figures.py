"""The report's figures, each drawn from the run files and returned as PNG bytes (the HTML
inlines them). matplotlib with the Agg backend; seaborn's palette.

- ``lambda_curves``: the paper's Fig 6, metrics against λ for Backward Search and the student;
- ``frontier``: precision@k against a context metric, curves over λ / β, Pareto points ringed;
- ``embedding_map``: the paper's Fig 5, t-SNE of the database sample with arrows z0 -> z*;
- ``retrieval_grid``: the paper's Figs 7-9, query and top-k thumbnails per method;
- ``per_class_precision``, ``iterations``: where the search fails, how long it runs;
- ``cost_quality``: ms per query against quality, optimisations joined to their distilled twins.
"""
from __future__ import annotations

import io
import json
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cir_bench.report.frontier import CURVE_FAMILIES, SYMBOL
from cir_bench.report.inputs import RunFiles


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    return plt


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _colors(names: Sequence[str]) -> dict[str, Any]:
    import seaborn as sns

    palette = sns.color_palette("tab10", max(len(names), 1))
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def _lam_axis(values: np.ndarray) -> tuple[np.ndarray, float]:
    """λ on a log axis; λ = 0 drawn at a quarter of the smallest positive λ, apart from the curve."""
    pos = values[values > 0]
    zero_at = float(pos.min() / 4) if pos.size else 1e-4
    return np.where(values > 0, values, zero_at), zero_at


def lambda_curves(points: pd.DataFrame, metrics: Sequence[tuple[str, str]]) -> bytes:
    """``points``: query_set, family, param, metric, mean, low, high of Backward Search and
    student rows. One panel per metric; one line per (family, query set) with its CI band."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    sets = list(dict.fromkeys(points["query_set"]))
    colors = _colors(sets)
    zero_at = _lam_axis(points["param"].to_numpy(dtype=float))[1]
    for ax, (metric, title) in zip(axes[0], metrics):
        for (qs, family), g in points[points["metric"] == metric].groupby(["query_set", "family"], sort=False):
            g = g.sort_values("param")
            # λ = 0 is another problem (Eq 4 without its regulariser), not a point of the log
            # curve: drawn apart, hollow, with its interval, never joined to the line
            pos, zero = g[g["param"] > 0], g[g["param"] <= 0]
            style = "-o" if family == "backward" else "--s"
            ax.plot(pos["param"], pos["mean"], style, color=colors[qs], label=f"{family} · {qs}", ms=4)
            ax.fill_between(pos["param"], pos["low"], pos["high"], color=colors[qs],
                            alpha=0.15 if family == "backward" else 0.08)
            if len(zero):
                z = zero.iloc[0]
                ax.errorbar([zero_at], [z["mean"]], yerr=[[z["mean"] - z["low"]], [z["high"] - z["mean"]]],
                            fmt="o" if family == "backward" else "s", mfc="none", color=colors[qs], ms=5, capsize=2)
        ax.set_xscale("log")
        ax.axvline(zero_at * 2, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel(f"λ (hollow, left of the dotted line: λ = 0, drawn at {zero_at:g})")
        ax.set_title(f"{title} against λ")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def solver_curves(points: pd.DataFrame, metrics: Sequence[tuple[str, str]]) -> bytes:
    """The λ curve: one row of panels per query set, one panel per metric; the run's Backward
    Search (``preset``) solid, Eq 4 solved to its tolerance (``converged``) dashed, each with its
    95 % band; λ = 0 (no minimiser: each solver's own budget) hollow, left of the dotted line."""
    plt = _plt()
    sets = list(dict.fromkeys(points["query_set"]))
    fig, axes = plt.subplots(len(sets), len(metrics), figsize=(4.6 * len(metrics), 3.4 * len(sets)), squeeze=False)
    solvers = list(dict.fromkeys(points["family"]))
    colors = _colors(solvers)
    zero_at = _lam_axis(points["param"].to_numpy(dtype=float))[1]
    for row, qs in zip(axes, sets):
        for ax, (metric, title) in zip(row, metrics):
            sub = points[(points["query_set"] == qs) & (points["metric"] == metric)]
            for solver, g in sub.groupby("family", sort=False):
                g = g.sort_values("param")
                pos, zero = g[g["param"] > 0], g[g["param"] <= 0]
                ax.plot(pos["param"], pos["mean"], "-o" if solver == "preset" else "--s", color=colors[solver],
                        label=solver, ms=3.5)
                ax.fill_between(pos["param"], pos["low"], pos["high"], color=colors[solver], alpha=0.15)
                if len(zero):
                    z = zero.iloc[0]
                    ax.errorbar([zero_at], [z["mean"]], yerr=[[z["mean"] - z["low"]], [z["high"] - z["mean"]]],
                                fmt="o" if solver == "preset" else "s", mfc="none", color=colors[solver], ms=5,
                                capsize=2)
            ax.set_xscale("log")
            ax.axvline(zero_at * 2, color="0.6", lw=0.8, ls=":")
            ax.set_xlabel("λ (hollow: λ = 0)")
            ax.set_title(f"{qs}: {title}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def frontier(frames: Sequence[tuple[pd.DataFrame, str]], query_set: str, x_title: str) -> bytes:
    """One panel per (points, y title): every method with its 95 % CIs, curves over the swept
    parameter, Pareto-optimal points ringed in black, the oracle hollow (reference only)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(frames), figsize=(5.2 * len(frames), 4.4), squeeze=False)
    families = list(dict.fromkeys(f for frame, _ in frames for f in frame["family"]))
    colors = _colors(families)
    for ax, (frame, y_title) in zip(axes[0], frames):
        for family, g in frame.groupby("family", sort=False):
            g = g.sort_values("param") if family in CURVE_FAMILIES else g
            c = colors[family]
            ax.errorbar(g["x"], g["y"], xerr=[g["x"] - g["x_low"], g["x_high"] - g["x"]],
                        yerr=[g["y"] - g["y_low"], g["y_high"] - g["y"]], fmt="none", ecolor=c, alpha=0.35, lw=0.8)
            hollow = bool(g["reference_only"].any())
            ax.plot(g["x"], g["y"], "-o" if family in CURVE_FAMILIES and len(g) > 1 else "o", color=c, ms=5,
                    mfc="none" if hollow else c, label=family + (" (reference)" if hollow else ""))
            if family in CURVE_FAMILIES:
                key = SYMBOL[CURVE_FAMILIES[family]]
                for _, r in g.iterrows():
                    ax.annotate(f"{key}={r['param']:g}", (r["x"], r["y"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points", color=c)
        front = frame[frame["pareto"]]
        ax.scatter(front["x"], front["y"], s=110, facecolors="none", edgecolors="black", lw=1.2,
                   label="Pareto-optimal", zorder=5)
        ax.set_xlabel(f"{x_title} (condition satisfied)")
        ax.set_ylabel(y_title)
        ax.set_title(f"{query_set}: {x_title} vs {y_title}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return png(fig)


def embedding_map(run: RunFiles, query_set: str, methods: Sequence[str], n_queries: int, seed: int) -> bytes | None:
    """t-SNE (scikit-learn) of the run's database sample, the chosen queries' z0 and their z*
    under ``methods``, fitted jointly on unit vectors; database points coloured by the label
    of the query set's first property; arrows z0 -> z*."""
    from sklearn.manifold import TSNE

    pts = run.map_points
    if pts is None:
        return None
    prop = query_set.split("+")[0]
    moved = pts[(pts["role"] == "moved") & (pts["query_set"] == query_set) & pts["method"].isin(methods)]
    if moved.empty:
        return None
    ids = sorted(set(moved["query_id"]))
    rng = np.random.default_rng([seed, 17])
    chosen = list(rng.choice(ids, size=min(n_queries, len(ids)), replace=False))
    db = pts[pts["role"] == "database"]
    q = pts[(pts["role"] == "query") & pts["item_id"].isin(chosen)].drop_duplicates("item_id")
    mv = moved[moved["query_id"].isin(chosen)]
    z = np.stack([*db["z"], *q["z"], *mv["z"]]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, max(5.0, len(z) / 20))).fit_transform(z)
    n_db, n_q = len(db), len(q)
    labels = run.items.set_index("id")[prop]
    db_labels = labels.reindex(db["item_id"]).to_numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    classes = sorted(set(db_labels.astype(str)))
    colors = _colors(classes)
    for c in classes:
        m = db_labels.astype(str) == c
        ax.scatter(xy[:n_db][m, 0], xy[:n_db][m, 1], s=6, color=colors[c], alpha=0.45, label=c)
    q_xy = {item: xy[n_db + i] for i, item in enumerate(q["item_id"])}
    styles = {m: s for m, s in zip(methods, ["-", "--", ":", "-."])}
    for j, (_, r) in enumerate(mv.iterrows()):
        start, end = q_xy[r["item_id"]], xy[n_db + n_q + j]
        ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "lw": 1.3, "color": "black",
                                                          "linestyle": styles.get(r["method"], "-")})
    for item, p in q_xy.items():
        ax.scatter(*p, s=60, marker="*", color="black", zorder=5)
        ax.annotate(item, p, fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_xticks([])
    ax.set_yticks([])
    legend_methods = ", ".join(f"{'solid' if s == '-' else 'dashed' if s == '--' else 'dotted'}: {m}"
                               for m, s in styles.items())
    ax.set_title(f"{query_set}: t-SNE of {n_db} database items (colour: {prop}); ★ query z0, arrows to z* "
                 f"({legend_methods})", fontsize=8)
    ax.legend(fontsize=6, markerscale=2, loc="best", title=prop, title_fontsize=7)
    fig.tight_layout()
    return png(fig)


def retrieval_grid(query: str, conditions: dict[str, str], rows: Sequence[tuple[str, list[str]]],
                   image_of: Callable[[str], Any], labels_of: Callable[[str], dict[str, str]]) -> bytes:
    """One query: the query image, then per method its ranked thumbnails, each framed green
    with a tick-like disc when it satisfies every condition and red with a cross when not (so
    the mark does not rest on colour alone), its labels underneath. Composed with Pillow: a
    grid of 60+ matplotlib axes costs seconds, a pasted image milliseconds."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    small = ImageFont.load_default(size=10)
    thumbs = {item: Image.fromarray(np.asarray(image_of(item))) for _, ranked in rows for item in ranked}
    thumbs[query] = Image.fromarray(np.asarray(image_of(query)))
    size = max(max(t.size) for t in thumbs.values())
    k = max((len(r) for _, r in rows), default=0)
    pad, border, text_h, label_w, title_h = 6, 4, 26, 170, 34
    cell_w, cell_h = size + 2 * border + pad, size + 2 * border + text_h + pad
    width = label_w + (k + 1) * cell_w + pad
    height = title_h + len(rows) * cell_h + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title = (f"query {query}, condition " + ", ".join(f"{p} = {v}" for p, v in conditions.items())
             + "   (green frame and disc: satisfies every condition; red frame and cross: does not)")
    draw.text((pad, 8), title, fill="black", font=font)
    good, bad = (26, 150, 65), (215, 25, 28)
    for i, (method, ranked) in enumerate(rows):
        y = title_h + i * cell_h
        draw.text((pad, y + size // 2), method, fill="black", font=font)
        if i == 0:
            x = label_w
            canvas.paste(thumbs[query], (x + border, y + border))
            draw.rectangle([x, y, x + size + 2 * border - 1, y + size + 2 * border - 1], outline=(40, 40, 40), width=2)
            draw.text((x, y + size + 2 * border + 2), "query", fill="black", font=small)
            draw.text((x, y + size + 2 * border + 13), "/".join(labels_of(query).values())[:22], fill="black",
                      font=small)
        for j, item in enumerate(ranked):
            x = label_w + (j + 1) * cell_w
            labs = labels_of(item)
            ok = all(labs.get(p) == v for p, v in conditions.items())
            color = good if ok else bad
            canvas.paste(thumbs[item], (x + border, y + border))
            draw.rectangle([x, y, x + size + 2 * border - 1, y + size + 2 * border - 1], outline=color, width=border)
            mx, my = x + size + border - 14, y + border + 2  # the mark, top right
            if ok:
                draw.ellipse([mx, my, mx + 11, my + 11], fill=good, outline="white")
            else:
                draw.line([mx, my, mx + 11, my + 11], fill=bad, width=3)
                draw.line([mx, my + 11, mx + 11, my], fill=bad, width=3)
            draw.text((x, y + size + 2 * border + 2), f"{j + 1}. " + "/".join(labs[p] for p in conditions)[:20],
                      fill=color, font=small)
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def per_class_precision(frame: pd.DataFrame, metric_title: str, top: int = 16) -> bytes:
    """``frame``: condition, method, mean, low, high. Grouped bars with CIs; at most ``top``
    conditions (the worst of the first method) when there are more."""
    plt = _plt()
    methods = list(dict.fromkeys(frame["method"]))
    worst = (frame[frame["method"] == methods[0]].sort_values("mean")["condition"].tolist())[:top]
    frame = frame[frame["condition"].isin(worst)]
    fig, ax = plt.subplots(figsize=(max(5.0, min(14.0, 1.0 + 0.3 * len(worst) * max(1, len(methods)))), 3.8))
    width = 0.8 / max(len(methods), 1)
    colors = _colors(methods)
    x = np.arange(len(worst))
    for i, m in enumerate(methods):
        g = frame[frame["method"] == m].set_index("condition").reindex(worst)
        ax.bar(x + i * width - 0.4 + width / 2, g["mean"], width, color=colors[m], label=m,
               yerr=[g["mean"] - g["low"], g["high"] - g["mean"]], error_kw={"lw": 0.7, "alpha": 0.6})
    ax.set_xticks(x, worst, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(metric_title)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=min(4, len(methods)))
    fig.tight_layout()
    return png(fig)


def iterations(frame: pd.DataFrame) -> bytes:
    """``frame``: query_set, method, iterations. One histogram panel per query set."""
    plt = _plt()
    sets = list(dict.fromkeys(frame["query_set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.3), squeeze=False)
    for ax, qs in zip(axes[0], sets):
        g = frame[frame["query_set"] == qs]
        top = int(g["iterations"].max()) if len(g) else 1
        bins = np.linspace(0, max(top, 1), min(40, max(top, 1)) + 1)
        for m, h in g.groupby("method", sort=False):
            ax.hist(h["iterations"], bins=bins, alpha=0.55, label=f"{m} (mean {h['iterations'].mean():.1f})")
        ax.set_xlabel("iterations per query")
        ax.set_ylabel("queries")
        ax.set_title(qs)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def tune_lambda_curves(sweep: pd.DataFrame, metrics: Sequence[str]) -> bytes:
    """A Tune experiment's sweep rows: metric against λ per configuration and query set."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    x, zero_at = _lam_axis(sweep["lam"].to_numpy(dtype=float))
    sweep = sweep.assign(lam_plot=x)
    keys = list(dict.fromkeys(zip(sweep["config"], sweep["query_set"])))
    colors = _colors([f"{a} · {b}" for a, b in keys])
    for ax, metric in zip(axes[0], metrics):
        for (cfg, qs), g in sweep.groupby(["config", "query_set"], sort=False):
            g = g.groupby("lam_plot", as_index=False)[metric].mean().sort_values("lam_plot")
            ax.plot(g["lam_plot"], g[metric], "-o", ms=4, color=colors[f"{cfg} · {qs}"], label=f"{cfg} · {qs}")
        ax.set_xscale("log")
        ax.set_xlabel(f"λ (λ = 0 drawn at {zero_at:g})")
        ax.set_title(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def loadtest_latency(frame: pd.DataFrame) -> bytes:
    """p50/p99 latency against concurrency per method (closed-loop stages)."""
    plt = _plt()
    closed = frame[frame["mode"] == "closed"] if "mode" in frame else frame
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), squeeze=False)
    colors = _colors(list(dict.fromkeys(closed["method"])))
    for m, g in closed.groupby("method", sort=False):
        g = g.sort_values("concurrency")
        axes[0][0].plot(g["concurrency"], g["p50_ms"], "-o", color=colors[m], label=f"{m} p50")
        axes[0][0].plot(g["concurrency"], g["p99_ms"], "--", color=colors[m], label=f"{m} p99")
        axes[0][1].plot(g["concurrency"], g["qps"], "-o", color=colors[m], label=m)
    axes[0][0].set_xlabel("concurrency")
    axes[0][0].set_ylabel("ms")
    axes[0][1].set_xlabel("concurrency")
    axes[0][1].set_ylabel("requests / s")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def conditions_of(row: pd.Series) -> dict[str, str]:
    raw = row.get("conditions")
    return json.loads(raw) if isinstance(raw, str) else dict(raw or {})


MIN_MS = 1e-3  # the cost plot's floor: ms per query below it are drawn at it


def cost_quality(points: pd.DataFrame, pairs: Sequence[tuple[str, str, str]],
                 panels: Sequence[tuple[str, str]]) -> bytes:
    """ms per query (log axis) against each panel's metric, a row of panels per query set: every
    method a point with its 95 % CI; each pair (a per-query optimisation, its one-pass twin)
    joined by an arrow from the slow to the fast one. ``points``: query_set, method, metric,
    ms, y, y_low, y_high."""
    plt = _plt()
    sets = list(dict.fromkeys(points["query_set"]))
    fig, axes = plt.subplots(len(sets), len(panels), figsize=(5.6 * len(panels), 4.4 * len(sets)), squeeze=False)
    paired = {m for slow, fast, _ in pairs for m in (slow, fast)}
    for row, qs in zip(axes, sets):
        for ax, (metric, title) in zip(row, panels):
            g = points[(points["query_set"] == qs) & (points["metric"] == metric) & points["y"].notna()]
            g = g.set_index("method")
            g = g.assign(ms=g["ms"].clip(lower=MIN_MS))  # a log axis: what takes no measurable time sits at the floor
            if g.empty:
                ax.set_visible(False)
                continue
            ax.errorbar(g["ms"], g["y"], yerr=[g["y"] - g["y_low"], g["y_high"] - g["y"]], fmt="none",
                        ecolor="grey", alpha=0.5, lw=0.8)
            rest = g[~g.index.isin(paired)]
            ax.scatter(rest["ms"], rest["y"], s=18, color="grey", zorder=3)
            for method, r in rest.iterrows():
                ax.annotate(method, (r["ms"], r["y"]), fontsize=6, xytext=(3, 2), textcoords="offset points",
                            color="dimgrey")
            colors = _colors([label for *_, label in pairs])
            for slow, fast, label in pairs:
                if slow not in g.index or fast not in g.index:
                    continue
                c = colors[label]
                ax.scatter(g.loc[[slow, fast], "ms"], g.loc[[slow, fast], "y"], s=40, color=c, zorder=4, label=label)
                ax.annotate("", xy=(g.loc[fast, "ms"], g.loc[fast, "y"]), xytext=(g.loc[slow, "ms"], g.loc[slow, "y"]),
                            arrowprops={"arrowstyle": "->", "color": c, "lw": 1.4})
                for method in (slow, fast):
                    ax.annotate(method, (g.loc[method, "ms"], g.loc[method, "y"]), fontsize=7, xytext=(3, -9),
                                textcoords="offset points", color=c)
            ax.set_xscale("log")
            ax.set_xlabel("ms per query (log)")
            ax.set_ylabel(title)
            ax.set_title(f"{qs}: cost against {title}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return png(fig)
