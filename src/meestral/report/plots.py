"""The report's figures: one function per figure; each writes one PNG (atomically) and returns its path.

Inputs are parsed result files (see render.load_results); nothing here reads the results folder.
Sweep rows are grouped two ways, shared with render.py:
  panel  - one task (plus the backbone when the sweep holds several: their ratios are relative to
           different full models, so they must not share axes);
  series - one early-exit curve: the policy plus whatever else varies between the sweep's
           early-exit rows (heads, exit points...), so a curve never joins points of different settings.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

# Headless. Switching backends closes the caller's open figures, so leave an already-imported
# pyplot (a notebook's) alone: it saves PNGs just as well.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from meestral.errors import MeestralError  # noqa: E402
from meestral.files import atomic_write  # noqa: E402
from meestral.report.text import PLAIN_SPACE, shorten  # noqa: E402

X_AXES = {
    "weight_bytes_ratio": "weight bytes read per token, relative to full depth",
    "flops_ratio": "FLOPs per token, relative to full depth",
    "layer_fraction": "layers run per token, as a fraction of full depth (not wall-clock)",
}
SERIES_FIELDS = ("backbone", "heads", "exits", "exit_output", "limit", "max_backlog", "policy")
BASELINES = {"static": ("static exit", "s", ":"), "layer_drop": ("layer drop", "^", "-.")}
ORACLE_LABEL = "oracle (strict) bound"
DPI = 110


# ---- files ---------------------------------------------------------------------------------------
def _save(fig, path) -> Path:
    try:
        fig.tight_layout()
        return atomic_write(Path(path), lambda t: fig.savefig(t, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def _grid(n: int, ncols: int, size=(5.5, 4.0), **kw):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# ---- grouping ------------------------------------------------------------------------------------
def num(v) -> float | None:
    """A finite float, or None (missing, null, NaN, "N/A" as lm-eval writes some stderrs)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def text(s) -> str:
    """Plain text for matplotlib: a `$` in a token or path must not start mathtext."""
    return str(s).replace("$", r"\$")


def baseline(row) -> str | None:
    return row["config"].get("baseline")


def panels(rows) -> dict[str, list[dict]]:
    several = len({r["config"].get("backbone") for r in rows}) > 1
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(f"{r['task']} ({r['config'].get('backbone')})" if several else r["task"], []).append(r)
    return out


def _field(name, v) -> str:
    if name == "heads" and isinstance(v, str) and ":" in v:  # classifier:<dir>: the dir's last part
        kind, where = v.split(":", 1)
        return f"{kind}:{Path(where).name or where}"
    if name == "exits" and isinstance(v, list):
        return "exits " + ",".join(map(str, v))
    return {"limit": f"limit {v}", "max_backlog": f"backlog {v}"}.get(name, str(v))


def series_labeler(rows):
    """row -> curve label, from the fields that vary among all early-exit rows of the sweep (so a
    label, and its colour, mean the same in every panel and figure)."""
    ee = [r for r in rows if baseline(r) is None]
    varying = [f for f in SERIES_FIELDS
               if f == "policy" or len({json.dumps(r["config"].get(f), sort_keys=True) for r in ee}) > 1]
    return lambda r: " · ".join(_field(f, r["config"].get(f)) for f in varying)


def _threshold(r) -> float:
    t = num(r["config"].get("threshold"))
    return -math.inf if t is None else t


def series(rows, label) -> dict[str, list[dict]]:
    """Early-exit rows by curve label, each curve in threshold order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if baseline(r) is None:
            out.setdefault(label(r), []).append(r)
    for pts in out.values():
        pts.sort(key=_threshold)
    return dict(sorted(out.items()))


def _colors(rows, label) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(series(rows, label))}


def full_row(rows) -> dict | None:
    full = [r for r in rows if baseline(r) == "full"]
    return full[-1] if full else None


def oracle_source(oracle, task, backbone=None) -> dict | None:
    """The oracle of one task. Several backbones' oracles side by side come as
    {"by_backbone": {backbone: oracle}} (report/compare.py); then the row's backbone picks one."""
    if oracle and "by_backbone" in oracle:
        oracle = oracle["by_backbone"].get(backbone)
    return ((oracle or {}).get("sources") or {}).get(task)


def oracle_bound(src) -> float | None:
    """L / mean layers run of the oracle (evaluation.oracle writes `bound_speedup_layers`)."""
    src = src or {}
    return num(src.get("bound_speedup_layers", src.get("bound_speedup")))


def bound_source(name, src) -> str:
    """What an oracle bound was measured on: the source (held-out text or a task's documents) and its
    token count. A backbone's bounds differ from one text to another, so none is given without it."""
    n = num((src or {}).get("tokens"))
    return f"{name} ({n:,.0f} tokens)" if n is not None else str(name)


def _curve(src) -> tuple[list, list]:
    """(exit layers, agreement): the agreement is a {layer: value} map or a list over `layers`."""
    a = src.get("agreement") or {}
    if isinstance(a, dict):
        pts = sorted((int(k), num(v)) for k, v in a.items())
        return [l for l, _ in pts], [v for _, v in pts]
    return list(src.get("layers", range(len(a)))), [num(v) for v in a]


# ---- figures -------------------------------------------------------------------------------------
def _errorbars(ax, pts, x, **kw):
    pts = [r for r in pts if num(r.get(x)) is not None and num(r.get("value")) is not None]
    if not pts:
        return
    err = [num(r.get("stderr")) or 0.0 for r in pts]
    ax.errorbar([num(r[x]) for r in pts], [num(r["value"]) for r in pts], yerr=err if any(err) else None,
                capsize=2, ms=5, lw=1.3, **kw)
    return pts


def tradeoff(rows, oracle_data, path, x: str = "weight_bytes_ratio") -> Path:
    """Task metric against compute, one panel per task: a line per early-exit policy (points in
    threshold order), static-exit and layer-drop baselines, the full model (dashed line + star at
    its own x, which is 1), and the oracle's strict bound as a vertical line at its layer fraction.
    `verify` points are labelled with their draft acceptance rate."""
    if x not in X_AXES:
        raise MeestralError(f"unknown compute axis {x!r}: use one of {', '.join(X_AXES)}")
    label = series_labeler(rows)
    colors = _colors(rows, label)
    groups = panels(rows)
    fig, axes = _grid(len(groups), 2, size=(6.5, 4.6))
    for ax, (name, prs) in zip(axes, groups.items()):
        for s, pts in series(prs, label).items():
            drawn = _errorbars(ax, pts, x, color=colors[s], marker="o", label=text(s))
            for r in drawn or []:  # verify's price is set by how many drafts survive: say it at the point
                acc = num(r.get("draft_acceptance"))
                if r["config"].get("policy") in ("verify", "speculate") and acc is not None:
                    ax.annotate(f"{acc:.0%} acc.", (num(r[x]), num(r["value"])), fontsize=6, xytext=(3, -8),
                                textcoords="offset points", color=colors[s])
        for kind, (what, marker, ls) in BASELINES.items():
            pts = sorted((r for r in prs if baseline(r) == kind), key=lambda r: r["config"].get("layer") or 0)
            drawn = _errorbars(ax, pts, x, color="0.35", marker=marker, ls=ls, mfc="white", label=what)
            for r in drawn or []:  # which layer each baseline point is: the legend cannot say
                ax.annotate(f"{r['config'].get('layer')}", (num(r[x]), num(r["value"])), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color="0.35")
        full = full_row(prs)
        if full is not None and num(full.get("value")) is not None:
            v = num(full["value"])
            ax.axhline(v, ls="--", color="k", lw=1)
            ax.errorbar([num(full.get(x)) or 1.0], [v], yerr=num(full.get("stderr")), color="k", marker="*", ms=11,
                        capsize=2, label=f"full model ({v:.4g})")
        src = oracle_source(oracle_data, prs[0]["task"], prs[0]["config"].get("backbone"))
        if src and num(src.get("layer_fraction")) is not None:
            lf = num(src["layer_fraction"])
            ax.axvline(lf, color="tab:red", ls=(0, (5, 3)), lw=1.2,
                       label=text(f"{ORACLE_LABEL} on {bound_source(prs[0]['task'], src)}: {lf:.2f} of layers"))
        err = " ± stderr" if any(num(r.get("stderr")) for r in prs) else ""
        ax.set(title=text(name), xlabel=X_AXES[x], ylabel=text(f"{prs[0].get('metric', 'score')}{err}"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def agreement(rows, path) -> Path:
    """Agreement with the full model (solid) and exit rate (dashed) against the threshold."""
    label = series_labeler(rows)
    colors = _colors(rows, label)
    groups = {k: v for k, v in panels(rows).items() if series(v, label)}
    fig, axes = _grid(len(groups), 3, size=(5.2, 3.8))
    for ax, (name, prs) in zip(axes, groups.items()):
        for s, pts in series(prs, label).items():
            pts = [r for r in pts if num(r["config"].get("threshold")) is not None]
            t = [num(r["config"]["threshold"]) for r in pts]
            ax.plot(t, [num(r.get("agreement")) for r in pts], marker="o", ms=4, color=colors[s], label=text(s))
            ax.plot(t, [num(r.get("exit_rate")) for r in pts], ls="--", marker=".", color=colors[s])
        ax.set(title=text(name), xlabel="threshold (exit when confidence > threshold)",
               ylabel="agreement (solid) / exit rate (dashed)", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _bars(ax, hists, labels, colors=None):
    """Grouped bars of exit-layer histograms (as fractions of tokens), x = layer."""
    hists = [{int(k): v for k, v in (h or {}).items()} for h in hists]
    layers = sorted(set().union(*hists)) if hists else []
    width = 0.8 / max(1, len(hists))
    for i, (h, lab) in enumerate(zip(hists, labels)):
        total = sum(h.values()) or 1
        off = (i - (len(hists) - 1) / 2) * width
        ax.bar([j + off for j in range(len(layers))], [h.get(l, 0) / total for l in layers], width,
               label=text(lab), color=None if colors is None else colors[i])
    ax.set_xticks(range(len(layers)), [str(l) for l in layers])  # evenly spaced: exits are sparse
    ax.set(ylabel="fraction of tokens", ylim=(0, 1.02))


def exit_histograms(rows, path) -> Path:
    """Exit layers per task (rows) and policy (columns), at the lowest, middle and highest
    threshold of each curve; the last layer means no early exit."""
    label = series_labeler(rows)
    groups = {k: series(v, label) for k, v in panels(rows).items()}
    groups = {k: v for k, v in groups.items() if v}
    ncols = max(len(v) for v in groups.values())
    fig, axes = plt.subplots(len(groups), ncols, figsize=(4.6 * ncols, 3.4 * len(groups)), squeeze=False)
    for axrow, (name, curves) in zip(axes, groups.items()):
        for ax in axrow[len(curves):]:
            ax.set_visible(False)
        for ax, (s, pts) in zip(axrow, curves.items()):
            picks = [pts[i] for i in sorted({0, len(pts) // 2, len(pts) - 1})]
            _bars(ax, [r.get("exit_histogram") for r in picks],
                  [f"threshold {r['config'].get('threshold')}" for r in picks],
                  colors=[plt.get_cmap("viridis")(i / max(1, len(picks) - 1)) for i in range(len(picks))])
            L = picks[0].get("num_layers")
            ax.set(title=text(f"{name}: {s}"), xlabel=f"exit layer ({L - 1} = full depth)" if L else "exit layer")
            ax.legend(fontsize=7)
    return _save(fig, path)


def oracle(oracle_data, path) -> Path:
    """Per source: top-1 agreement of each exit point with the final layer, and where the oracle
    exits (the first exit point from which the top-1 token equals the final one and stays so)."""
    sources = oracle_data["sources"]
    fig, axes = plt.subplots(len(sources), 2, figsize=(11, 3.6 * len(sources)), squeeze=False)
    for (a, b), (name, s) in zip(axes, sources.items()):
        a.plot(*_curve(s), marker="o", label="top-1 (strict)")
        hists, labels = [s.get("exit_histogram")], ["strict oracle"]
        if s.get("topk"):  # the relaxed rule: the final token within the exit layer's top k
            k = s["topk"].get("k")
            a.plot(*_curve(s["topk"]), marker=".", ls="--", label=f"final token in top-{k}")
            hists.append(s["topk"].get("exit_histogram"))
            labels.append(f"top-{k} oracle")
        a.legend(fontsize=7)
        a.set(title=text(f"{name}: agreement with the final layer"), xlabel="exit layer",
              ylabel="agreement", ylim=(0, 1.02))
        a.grid(alpha=0.3)
        _bars(b, hists, labels)
        b.legend(fontsize=7)
        L, bound = s.get("num_layers") or oracle_data.get("num_layers"), oracle_bound(s)
        b.set(title=text(f"{bound_source(name, s)}: oracle exits" + (f" (strict bound {bound:.2f}x in layers)" if bound else "")),
              xlabel=f"exit layer ({L - 1} = full depth)" if L else "exit layer")
    return _save(fig, path)


def oracle_compare(sources: dict, path, title: str = "held-out text", source: str | None = None) -> Path:
    """Several backbones on one plot: top-1 agreement of each exit layer with the final layer,
    against depth as a fraction of the backbone's layers ((l+1)/L), with each strict oracle bound
    and the text it was measured on (`source`: the oracle source's name).
    `sources` maps a label (the backbone) to one oracle source of that backbone."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, src in sources.items():
        L = src.get("num_layers")
        if not L:
            raise MeestralError(f"oracle source for {label} has no num_layers: give an oracle.json made by meestral oracle")
        layers, agree = _curve(src)
        bound = oracle_bound(src)
        on = f" on {bound_source(source, src)}" if source else ""
        ax.plot([(l + 1) / L for l in layers], agree, marker=".",
                label=text(f"{label} ({L} layers; strict bound {bound:.2f}x in layers{on})" if bound
                           else f"{label} ({L} layers)"))
    ax.set(title=text(f"Agreement with the final layer by depth, {title}"), xlabel="depth (layers run / all layers)",
           ylabel="top-1 agreement with the final layer", xlim=(0, 1.0), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def calibration(cal, path) -> Path:
    """Estimated risk (disagreement among exited tokens) and p-value per candidate threshold;
    filled markers are thresholds the test certified."""
    grid = sorted(cal.get("grid") or [], key=lambda g: g["threshold"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    t = [g["threshold"] for g in grid]
    ax.plot(t, [g.get("risk") for g in grid], color="tab:blue", lw=1, label="risk")
    ok = [g for g in grid if g.get("rejected")]
    ax.scatter([g["threshold"] for g in ok], [g.get("risk") for g in ok], color="tab:blue", s=18,
               label="certified (null rejected)")
    ax.axhline(cal["epsilon"], color="tab:red", ls="--", label=f"ε = {cal['epsilon']}")
    if num(cal.get("threshold")) is not None:
        ax.axvline(cal["threshold"], color="k", ls=":", label=f"chosen threshold {cal['threshold']:.4g}")
    ax.set(xlabel="threshold", ylabel="risk: disagreement with the full model")
    ax.set_ylim(bottom=0)
    p = ax.twinx()
    p.plot(t, [g.get("p_value") for g in grid], color="tab:gray", lw=0.8, ls="-.", label="p-value")
    p.axhline(cal.get("delta", 0.1), color="tab:gray", lw=0.6, ls=":", label=f"δ = {cal.get('delta')}")
    p.set(ylabel="p-value", ylim=(0, 1.02))
    lines = ax.get_legend_handles_labels()[0] + p.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=7, loc="best")
    ax.set_title(f"{cal.get('method', '')} calibration, n = {cal.get('n')}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def training(records, path) -> Path:
    """Train loss, and F1 and AUROC per head from validation records (train records when the run
    had no validation); dashed: F1 of always exiting at that head."""
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"] or train
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    # A marker on every point: a short run logs one record, and a line through one point draws nothing.
    axes[0].plot([r["step"] for r in train], [num(r.get("loss")) for r in train], marker="o", ms=4)
    axes[0].set(title="train loss (sum over heads)", xlabel="step", ylabel="BCE")
    split = val[0]["split"] if val else "val"
    for ax, key in ((axes[1], "f1"), (axes[2], "auroc")):
        for layer in (val[-1]["heads"] if val else {}):
            pts = [r for r in val if layer in r["heads"]]
            line, = ax.plot([r["step"] for r in pts], [num(r["heads"][layer].get(key)) for r in pts],
                            marker="o", ms=4, label=f"exit {layer}")
            base = num(val[-1]["heads"][layer].get("f1_always_exit"))
            if key == "f1" and base is not None:
                ax.axhline(base, ls="--", lw=0.8, color=line.get_color())
        ax.set(title=f"{split} {key.upper()} per head" + (" (dashed: always exit)" if key == "f1" else ""),
               xlabel="step", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


PAGE_PX = 1150  # the report page's width for a figure (render.CSS: max-width 1200px less padding)
LENS_FONT = 7.5  # points: at DPI 110 and shown unscaled (a figure no wider than PAGE_PX), 11 px


def token_label(tok, width: int) -> str:
    """A token as a cell or tick label: white space around a word dropped (" the" -> "the"), a
    token that is only white space drawn (⏎, ␣), at most `width` characters with "…" when cut."""
    tok = str(tok)
    return text(shorten(tok.strip(PLAIN_SPACE) or tok, width, strip=False))


def lens(lens_data, path, per_row: int = 21, cell_chars: int = 7) -> Path:
    """Logit lens: layers x tokens, each cell the layer's top-1 token, green where it equals the
    final layer's; below it, the exit confidence per token at each exit point. Every token is drawn,
    at most `per_row` to a block (blocks of equal size, stacked), so that the figure fits the report
    page unscaled and its cell text stays readable."""
    toks, layers = lens_data["tokens"], lens_data["layers"]
    conf = lens_data.get("confidence") or {}
    per_row = math.ceil(len(toks) / max(1, math.ceil(len(toks) / per_row)))  # 40 tokens: two blocks of 20
    blocks = [(a, min(a + per_row, len(toks))) for a in range(0, len(toks), per_row)] or [(0, 0)]
    width = min(PAGE_PX / DPI, 1.3 + 0.46 * min(per_row, max(1, len(toks))))  # 0.46 in: 7 characters at LENS_FONT
    ratios = ([4, 1] if conf else [1]) * len(blocks)
    fig, axes = plt.subplots(len(ratios), 1, squeeze=False, gridspec_kw={"height_ratios": ratios},
                             figsize=(width, len(blocks) * (1.6 + 0.22 * len(layers) + 1.8 * bool(conf))))
    axes = [row[0] for row in axes]
    for n, (a, b) in enumerate(blocks):
        ax = axes[n * (2 if conf else 1)]
        ax.imshow([[bool(x) for x in row[a:b]] for row in lens_data["agree_final"]],
                  cmap=ListedColormap(["#f4d6d2", "#bfe3b4"]), vmin=0, vmax=1, aspect="auto",
                  interpolation="nearest", origin="lower")
        for i, row in enumerate(lens_data["top_tokens"]):
            for j, tok in enumerate(row[a:b]):
                ax.text(j, i, token_label(tok, cell_chars), ha="center", va="center", fontsize=LENS_FONT)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=LENS_FONT)
        ax.set_ylabel("layer")
        if n == 0:
            ax.set_title("logit lens: top-1 token per layer (green: equals the final layer's)", fontsize=9)
        bottom = ax
        if conf:
            bottom = axes[n * 2 + 1]
            for layer, vals in conf.items():
                bottom.plot(range(len(vals[a:b])), vals[a:b], marker=".", label=f"exit {layer}")
            bottom.set(ylabel="confidence", ylim=(0, 1.02))
            bottom.legend(fontsize=7, ncol=min(6, len(conf)))
            bottom.grid(alpha=0.3)
            ax.set_xticks([])
        for x in (ax, bottom):  # a short last block keeps the cell width of the others
            x.set_xlim(-0.5, per_row - 0.5 if len(blocks) > 1 else max(1, b - a) - 0.5)
        bottom.set_xticks(range(b - a), [token_label(t, 10) for t in toks[a:b]], rotation=70, fontsize=LENS_FONT)
        bottom.set_xlabel(f"input tokens {a + 1}-{b} of {len(toks)}" if len(blocks) > 1 else "input token")
    return _save(fig, path)


def drift(drift_data, path) -> Path:
    """How much each layer changes the hidden state: mean cosine with the previous layer's state,
    and the mean hidden-state norm."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.plot(drift_data["layers"], drift_data["cosine"], marker="o", ms=3)
    a.set(title="cosine(h[l-1], h[l]), mean over tokens", xlabel="layer l", ylabel="cosine similarity")
    norm = drift_data["norm"]
    # The norm may cover every layer while the cosine (a pair of layers) starts at layer 1.
    xs = drift_data["layers"] if len(norm) == len(drift_data["layers"]) else range(len(norm))
    b.plot(xs, norm, marker="o", ms=3, color="tab:orange")
    b.set(title="hidden-state norm, mean over tokens", xlabel="layer", ylabel="L2 norm")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _save(fig, path)
