"""The report of a results folder: every figure plus the numbers behind it, as a self-contained
`report.html` (images inlined, CSS inline, no external assets) and `report.md` (same text, images
under `figures/`).

    from meestral.report import write_report
    html, md = write_report("results")   # -> results/report.html, results/report.md, results/figures/

Results folder: `sweep.jsonl` (required), and optionally `oracle.json`, `calibration.json`,
`lens.json`, `train/log.jsonl` (the trainer's log); a missing optional file makes its section say
"not run". Both documents are built from one list of blocks, so they cannot say different things.
Compute is always named for what it is: weight bytes, FLOPs or layers per token relative to full
depth; a layer ratio is called a speed-up only "in layers", and the oracle's strict bound stands
next to every speed-up.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from meestral.errors import MeestralError
from meestral.report import plots
from meestral.files import write_together
from meestral.report.plots import baseline, num
from meestral.report.text import shorten

FIGURES = ("tradeoff", "agreement", "exit_histograms", "oracle", "calibration", "training", "lens", "drift")
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
DASH = "—"


# ---- reading -------------------------------------------------------------------------------------
def _text(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is a user error naming the file, line and offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if path.name.endswith(".jsonl") and b"\n" not in raw[e.start:] and not raw.endswith(b"\n"):
            # inside an append cut short by a kill (the last line, no newline): the lines before it, and
            # a stand-in for the cut line that _jsonl skips as unfinished
            return raw[:raw.rfind(b"\n") + 1].decode("utf-8") + "\ufffd"
        line = raw[:e.start].count(b"\n") + 1
        fix = "delete that line" if path.name.endswith(".jsonl") else "delete the file"
        raise MeestralError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}): "
                            f"rerun the command that wrote it, or {fix}") from None


def _json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise MeestralError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): rerun the command that wrote it "
                            "or delete the file") from None


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    raw = _text(path)
    lines = raw.split("\n")  # (not splitlines: JSON text may hold U+2028 and the like)
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not raw.endswith("\n"):  # an append cut short by a kill: skip it
                print(f"meestral: skipping the unfinished last line of {path}", file=sys.stderr)
                continue
            raise MeestralError(f"{path} line {i} is not valid JSON ({e.msg}): delete that line or rerun "
                                "the command that wrote it") from None
    return out


def load_results(results_dir) -> dict:
    """The parsed result files; missing optional ones are None. The sweep table's header line (which
    names the configuration) is skipped; rows with the same key are one point evaluated again: the
    last one counts."""
    d = Path(results_dir).expanduser()
    if d.is_file():
        raise MeestralError(f"results folder {d} is a file: pass the folder that holds sweep.jsonl (`meestral sweep "
                            "--out <folder>/sweep.jsonl`)")
    if not d.is_dir():
        raise MeestralError(f"results folder {d} does not exist: pass the folder `meestral sweep` wrote")
    sweep = d / "sweep.jsonl"
    rows: dict = {}
    for i, r in enumerate(_jsonl(sweep)):
        if "meestral_sweep" in r:  # the header line (evaluation.sweep.ResultsTable)
            continue
        missing = [k for k in ("task", "config", "value") if k not in r]
        if missing:
            raise MeestralError(f"{sweep}: record {i + 1} lacks {', '.join(missing)}: it is not a sweep record; "
                                "remove it or rerun `meestral sweep`")
        rows[r.get("key", i)] = r
    if not rows:
        raise MeestralError(f"no sweep results in {sweep}: run `meestral sweep` first")
    return {"dir": d, "sweep": list(rows.values()), "oracle": _json(d / "oracle.json"),
            "calibration": _json(d / "calibration.json"), "lens": _json(d / "lens.json"),
            "train_log": _jsonl(d / "train" / "log.jsonl") or None}


# ---- numbers -------------------------------------------------------------------------------------
def tolerance(full_value: float) -> float:
    """One point of the metric: 0.01 on a 0-1 scale (accuracies), 1 on a percent-like scale."""
    return 0.01 if abs(full_value) <= 1 else 1.0


def best_within(rows, full, x: str = "weight_bytes_ratio") -> dict | None:
    """The cheapest row (least `x`; ties: higher score) scoring within one point of the full model."""
    fv = num(full.get("value")) if full else None
    if fv is None:
        return None
    lower = full.get("metric") in LOWER_IS_BETTER
    tol = tolerance(fv)
    ok = [r for r in rows if num(r.get("value")) is not None and num(r.get(x)) is not None
          and (num(r["value"]) <= fv + tol if lower else num(r["value"]) >= fv - tol)]
    return min(ok, key=lambda r: (num(r[x]), num(r["value"]) * (1 if lower else -1)), default=None)


def exits(r) -> bool:
    """Whether a sweep point leaves the network early at all: a setting at exit rate 0 is the full
    model under another name, so it is never a headline's "best early exit"."""
    return (num(r.get("exit_rate")) or 0) > 0


def best_early_exit(rows, full, x: str = "weight_bytes_ratio") -> tuple[dict | None, str]:
    """The headline: the cheapest early-exit setting within one point of the full model that exits
    (exit rate > 0) and costs less than it (`x` below 1), and, when there is none, the words that
    say why."""
    moving = [r for r in rows if exits(r)]
    # A setting that exits yet costs the full model's bytes or more (verify's deep passes re-run
    # what the exits skipped) saves nothing: it is not an early exit worth a headline either.
    b = best_within([r for r in moving if num(r.get(x)) is not None and num(r[x]) < 1], full, x)
    if b is not None:
        return b, ""
    if best_within(moving, full, x) is not None:
        return None, "none that saves compute within 1 point"
    idle = best_within(rows, full, x) is not None
    return None, "none that exits within 1 point" if idle else "none within 1 point"


def _f(v, spec=".3f") -> str:
    v = num(v)
    return DASH if v is None else format(v, spec)


def _score(r) -> str:
    se = num(r.get("stderr"))
    return _f(r.get("value"), ".4g") + (f" ± {se:.2g}" if se is not None else "")


def _bound(src, name: str | None = None) -> str:
    """The oracle's strict bound; with `name`, also the text it was measured on (a backbone has one
    bound per source: held-out text and each task's documents give different bounds)."""
    b = plots.oracle_bound(src)
    if not b:
        return "not run"
    return f"{b:.2f}× in layers" + (f" on {plots.bound_source(name, src)}" if name else "")


def _setting(r, label) -> str:
    kind, c = baseline(r), r["config"]
    if kind == "full":
        return f"all {r['num_layers']} layers" if r.get("num_layers") else "all layers"
    if kind == "static":
        return f"always exit at layer {c.get('layer')}"
    if kind == "layer_drop":
        return f"{c.get('layer')} blocks before the last dropped"
    if kind is not None:
        return f"{kind} {c.get('layer')}"
    return f"{label(r)}, threshold {c.get('threshold')}"


def _cells(r, full, src, label) -> list[str]:
    """One table row for a sweep point; ratios are relative to full depth of the same backbone."""
    v, fv = num(r.get("value")), num((full or {}).get("value"))
    lf, ms, fms = num(r.get("layer_fraction")), num(r.get("ms_per_token")), num((full or {}).get("ms_per_token"))
    wall = f"{ms:.3g}" + (f" ({fms / ms:.2f}× wall-clock)" if fms and ms and r is not full else "") if ms else DASH
    return [_setting(r, label), _score(r), DASH if v is None or fv is None or r is full else f"{v - fv:+.4g}",
            _f(r.get("weight_bytes_ratio")), _f(r.get("flops_ratio")), _f(lf),
            f"{1 / lf:.2f}× in layers" if lf else DASH, _bound(src) if src else DASH,
            _f(r.get("agreement")), _f(r.get("exit_rate")), _acceptance(r), wall]


def _acceptance(r) -> str:
    """verify: drafts the full model confirmed (what sets verify's cost), and how many were rolled back."""
    if r["config"].get("policy") not in ("verify", "speculate"):  # the lossless policies: drafts checked
        return DASH
    acc = num(r.get("draft_acceptance"))
    if acc is None:
        if "draft_acceptance" not in r and num(r.get("exit_rate")):
            return "not counted (a sweep row from before rejected drafts were priced: rerun it)"
        return "no drafts"
    return f"{acc:.3f} ({_f(r.get('rolled_back'), '.0f')} rolled back)"


def _header(metric) -> list[str]:
    return ["", "setting", f"{metric} ± stderr", "Δ vs full", "weight bytes / full", "FLOPs / full",
            "layers run / full depth", "speed-up in layers", "oracle strict bound", "agreement with full",
            "exit rate", "draft acceptance (verify, speculate)", "ms/token (speed-up, wall-clock)"]


# ---- sections (each appends blocks to `doc`, figures to `figs`) ----------------------------------
def _intro(doc, res, x):
    rows = res["sweep"]
    bbs = sorted({f"{r['config'].get('backbone')} ({str(r['config'].get('fingerprint', ''))[:12]})" for r in rows})
    doc.append(("p", f"Results folder `{res['dir']}`: {len(rows)} sweep points over "
                     f"{len(plots.panels(rows))} task(s); backbone: {', '.join(bbs)}. "
                     f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."))
    doc.append(("p", "How to read the numbers: compute is given per emitted token relative to the same backbone "
                     "at full depth — weight bytes read (what bounds batch-1 decoding), FLOPs, and layers run. "
                     "A layer ratio is not a wall-clock speed-up; wall-clock comes from the ms/token measured "
                     "in the sweep, which exists only for generation tasks (log-likelihood tasks are scored by a "
                     "teacher-forced pass whose time is not a decoding speed). `verify` scores exactly the full "
                     "model's log-likelihoods; its cost is what greedy generation would pay on the same tokens: "
                     "each early token is a draft, a draft whose top-1 differs from the full model's is rolled back "
                     "at the next deep pass, and the work on it and on the drafts made after it is charged (those "
                     "are run through the model; the count equals the decoder's, tested). Draft acceptance: the "
                     "share of drafts the full model confirmed; each rejection costs a deep pass plus the drafts after "
                     "it, so at a low acceptance verify reads more weight bytes than the full model. The oracle (strict) bound is the fewest layers a token-identical exit could run "
                     "(each token leaves at the first exit point from which its top-1 equals the final one and stays "
                     "so); savings beyond it cost agreement. Agreement: fraction of scored tokens whose emitted "
                     f"top-1 equals the full model's. The main figure's x axis: {plots.X_AXES[x]}."))


def _tradeoff(doc, res, figs, figdir, x):
    rows, label = res["sweep"], plots.series_labeler(res["sweep"])
    doc.append(("h", 2, "Quality against compute"))
    figs["tradeoff"] = plots.tradeoff(rows, res["oracle"], figdir / "tradeoff.png", x=x)
    doc.append(("fig", "tradeoff", "Task metric against compute per task: a line per policy (threshold points "
                                   "joined in threshold order), static-exit and layer-drop baselines (point labels: "
                                   "layer), the full model (dashed), the oracle strict bound (vertical, in layers)."))
    for name, prs in plots.panels(rows).items():
        full, src = plots.full_row(prs), plots.oracle_source(res["oracle"], prs[0]["task"])
        metric = prs[0].get("metric", "score")
        doc.append(("h", 3, name))
        if full is None:
            doc.append(("p", "No full-model row for this task, so no comparison: run the sweep with the full baseline."))
            continue
        if src:
            where = f" (layer fraction {_f(src.get('layer_fraction'))})."
        elif res["oracle"]:
            where = f" on this task (oracle.json covers {', '.join(res['oracle'].get('sources') or {}) or 'nothing'})."
        else:
            where = " (no oracle.json)."
        if src:  # the bound differs per text: say which one this is
            where = where[:-1] + f", measured on {plots.bound_source(prs[0]['task'], src)}."
        doc.append(("p", f"Full model: {metric} {_score(full)} (limit {full['config'].get('limit')}). "
                         f"Oracle strict bound: {_bound(src)}{where}"))
        table = [["full model"] + _cells(full, full, src, label)]
        for what, kind in (("best early exit", None), ("best static exit", "static"), ("best layer drop", "layer_drop")):
            cands = [r for r in prs if baseline(r) == kind]
            if not cands:
                continue
            b, none = best_early_exit(cands, full, x) if kind is None else (best_within(cands, full, x),
                                                                             "none within 1 point")
            table.append([f"{what} within 1 point"] + (_cells(b, full, src, label) if b else [none] + [DASH] * 11))
            if kind is None:
                doc.append(("p", _best_sentence(b, full, src, label, metric) if b else _no_exit_sentence(cands, full, x, label)))
        doc.append(("table", _header(metric), table))


def _no_exit_sentence(rows, full, x, label) -> str:
    dear = [r for r in rows if exits(r) and best_within([r], full, x)]
    if dear:
        b = best_within(dear, full, x)
        return (f"Best early exit within 1 point: none that saves compute. The {len(dear)} setting(s) within 1 point "
                f"of the full model that exit cost at least what it does (the cheapest, {_setting(b, label)}, "
                f"{_f(b.get(x))} of its {x.replace('_ratio', '').replace('_', ' ')}): their exits' savings go to "
                "deep passes that re-run the skipped layers (verify) or to the exit heads.")
    idle = [r for r in rows if not exits(r) and best_within([r], full, x)]
    if idle:
        return (f"Best early exit within 1 point: none. The {len(idle)} early-exit setting(s) within 1 point of the "
                "full model never exit (exit rate 0): they run every layer, so they score and cost what the full "
                "model does; a lower threshold, or heads trained longer, is needed for an exit.")
    return "Best early exit within 1 point: none; every early-exit setting scores more than 1 point from the full model."


def _best_sentence(b, full, src, label, metric) -> str:
    lf = num(b.get("layer_fraction"))
    wb, fl = num(b.get("weight_bytes_ratio")), num(b.get("flops_ratio"))
    parts = []
    if wb:
        parts.append(f"reads {wb:.3f} of the full model's weight bytes per token "
                     + (f"({1 / wb:.2f}× fewer bytes)" if wb < 1 else "(no fewer than the full model)"))
    if fl:
        parts.append(f"does {fl:.3f} of its FLOPs")
    if lf:
        parts.append(f"runs {lf:.3f} of its layers (a {1 / lf:.2f}× speed-up in layers; oracle strict bound "
                     f"{_bound(src)})")
    ms, fms = num(b.get("ms_per_token")), num(full.get("ms_per_token"))
    if ms and fms:
        parts.append(f"measured {ms:.3g} ms/token against {fms:.3g} (a {fms / ms:.2f}× wall-clock speed-up; "
                     f"oracle strict bound {_bound(src)})")
    if b["config"].get("policy") in ("verify", "speculate"):
        parts.append(f"with draft acceptance {_acceptance(b)}")
    return (f"Best early exit within 1 point: {_setting(b, label)} scores {metric} {_score(b)} with agreement "
            f"{_f(b.get('agreement'))}; it " + ", ".join(parts or ["has no compute figures"]) + ".")


def _thresholds(doc, res, figs, figdir):
    doc.append(("h", 2, "Agreement, exit rate and exit layers"))
    if not any(baseline(r) is None for r in res["sweep"]):
        doc.append(("p", "Not run: the sweep holds no early-exit points (only baselines)."))
        return
    figs["agreement"] = plots.agreement(res["sweep"], figdir / "agreement.png")
    doc.append(("fig", "agreement", "Agreement with the full model (solid) and exit rate (dashed) against the "
                                    "threshold, per policy and task."))
    figs["exit_histograms"] = plots.exit_histograms(res["sweep"], figdir / "exit_histograms.png")
    doc.append(("fig", "exit_histograms", "Where tokens exit, per task (rows) and policy (columns), at the lowest, "
                                          "middle and highest threshold; the last layer means full depth."))


def _oracle(doc, res, figs, figdir):
    doc.append(("h", 2, "Oracle bound"))
    o = res["oracle"]
    if not o or not o.get("sources"):
        doc.append(("p", "Not run: no oracle.json in the results folder (`meestral oracle` writes it)."))
        return
    topk = any(s.get("topk") for s in o["sources"].values())
    rows = []
    for name, s in o["sources"].items():
        L = s.get("num_layers") or o.get("num_layers", "?")
        rows.append([name, str(s.get("tokens", DASH)), ",".join(map(str, s.get("layers", []))),
                     f"{_f(s.get('mean_layers_run'), '.2f')} of {L}", _f(s.get("layer_fraction")), _bound(s)])
        if topk:  # the relaxed rule's oracle: what top-k labels could buy, at a cost in agreement
            t = s.get("topk") or {}
            rows[-1] += [f"top-{t['k']}: {_f(t.get('layer_fraction'))}" if t else DASH, _bound(t) if t else DASH]
    header = ["source", "tokens", "exit points", "mean layers run", "layer fraction",
              "strict bound (speed-up in layers)"]
    doc.append(("table", header + (["top-k oracle layer fraction", "top-k bound (speed-up in layers)"] if topk else []),
                rows))
    figs["oracle"] = plots.oracle(o, figdir / "oracle.png")
    doc.append(("fig", "oracle", "Per source: top-1 agreement of each exit point with the final layer, and the "
                                 "oracle's exit layers."))


def _calibration(doc, res, figs, figdir):
    doc.append(("h", 2, "Calibrated threshold"))
    c = res["calibration"]
    if not c:
        doc.append(("p", "Not run: no calibration.json in the results folder (`meestral calibrate` writes it)."))
        return
    t = num(c.get("threshold"))
    ha = num(c.get("heldout_agreement"))
    # evaluation.calibration writes threshold 1.0 (never exit) when no grid point was certified.
    never = t is None or (c.get("grid") and not any(g.get("rejected") for g in c["grid"]))
    doc.append(("p", f"Method {c.get('method')}, ε = {c.get('epsilon')}, δ = {c.get('delta')}, n = {c.get('n')} "
                     f"calibration {c.get('unit', 'token')}s. Chosen threshold: "
                     + ("none certified (no threshold keeps the risk under ε): never exit" if never else f"{t:.4g}")
                     + f". Agreement on the calibration tokens {_f(c.get('calib_agreement'))}; on "
                     f"{c.get('heldout_n', '?')} held-out tokens {_f(ha)}"
                     + (f" (disagreement {1 - ha:.3f} against ε = {c.get('epsilon')})" if ha is not None else "")
                     + f", held-out exit rate {_f(c.get('heldout_exit_rate'))}."
                     + "".join(f" {c[k]}." for k in ("note", "note_policy") if c.get(k))))
    figs["calibration"] = plots.calibration(c, figdir / "calibration.png")
    doc.append(("fig", "calibration", "Risk against threshold with the ε line; filled points are certified; the "
                                      "dotted line is the chosen threshold; grey: p-values against δ."))


def _training(doc, res, figs, figdir):
    doc.append(("h", 2, "Exit-head training"))
    log = res["train_log"]
    if not log:
        doc.append(("p", "Not run: no train/log.jsonl in the results folder (`meestral train --out <results>/train` "
                         "writes it)."))
        return
    last = ([r for r in log if r.get("split") == "val"] or log)[-1]
    rows = [[f"exit {layer}", _f(m.get("f1")), _f(m.get("f1_always_exit")), _f(m.get("auroc")),
             _f(m.get("precision")), _f(m.get("recall")), _f(m.get("label_rate"))] for layer, m in last["heads"].items()]
    doc.append(("p", f"Last {last.get('split')} record, step {last.get('step')} ({last.get('tokens')} tokens)."))
    doc.append(("table", ["head", "F1", "F1 of always exiting", "AUROC", "precision", "recall", "label rate"], rows))
    figs["training"] = plots.training(log, figdir / "training.png")
    doc.append(("fig", "training", "Train loss, and F1 and AUROC per head; dashed: F1 of always exiting."))


def _lens(doc, res, figs, figdir):
    doc.append(("h", 2, "Logit lens"))
    lz = res["lens"]
    if not lz:
        doc.append(("p", "Not run: no lens.json in the results folder."))
        return
    # drawn visibly (a raw newline would end the Markdown paragraph), "…" where it is cut
    doc.append(("p", f"Sample text ({len(lz['tokens'])} tokens): “{shorten(''.join(lz['tokens']), 300)}”"))
    figs["lens"] = plots.lens(lz, figdir / "lens.png")
    doc.append(("fig", "lens", "Each layer's top-1 token (final norm + LM head on its hidden state); green where it "
                               "equals the final layer's. Below: exit confidence per token at each exit point."))
    if lz.get("drift"):
        figs["drift"] = plots.drift(lz["drift"], figdir / "drift.png")
        doc.append(("fig", "drift", "Hidden-state drift: cosine between consecutive layers and mean norm per layer."))


def _all_points(doc, res):
    rows, label = res["sweep"], plots.series_labeler(res["sweep"])
    doc.append(("h", 2, "All sweep points"))
    order = {"full": 0, None: 1, "static": 2, "layer_drop": 3}
    for name, prs in plots.panels(rows).items():
        full, src = plots.full_row(prs), plots.oracle_source(res["oracle"], prs[0]["task"])
        setting = lambda r: num(r["config"].get("threshold" if baseline(r) is None else "layer"))  # noqa: E731
        prs = sorted(prs, key=lambda r: (order.get(baseline(r), 4), label(r) if baseline(r) is None else "",
                                         -math.inf if setting(r) is None else setting(r)))
        table = [[baseline(r) or "early exit"] + _cells(r, full, src, label) for r in prs]
        doc.append(("details", f"{name}: {len(prs)} points", ("table", _header(prs[0].get("metric", "score")), table)))


# ---- output --------------------------------------------------------------------------------------
def _inline(s: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s, quote=False))


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _markdown(doc, title, figs, out: Path) -> str:
    lines = [f"# {title}", ""]

    def block(b):
        if b[0] == "h":
            lines.extend(["#" * b[1] + " " + b[2], ""])
        elif b[0] == "p":
            lines.extend([b[1], ""])
        elif b[0] == "table":
            lines.append("| " + " | ".join(map(_md_cell, b[1])) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines.extend("| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2])
            lines.append("")
        elif b[0] == "fig":
            rel = figs[b[1]].relative_to(out).as_posix()
            lines.extend([f"![{b[2]}]({rel})", "", f"*{b[2]}*", ""])
        elif b[0] == "details":
            lines.extend([f"**{b[1]}**", ""])
            block(b[2])

    for b in doc:
        block(b)
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
body{line-height:1.45}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2),th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
code{background:#f3f3f3;padding:0 .2em}details{margin:.5em 0}summary{cursor:pointer;font-weight:600}"""


def _html(doc, title, figs) -> str:
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]

    def block(b):
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "fig":
            data = base64.b64encode(figs[b[1]].read_bytes()).decode("ascii")
            parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(b[2])}\">"
                         f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        elif b[0] == "details":
            parts.append(f"<details><summary>{html.escape(b[1])}</summary>")
            block(b[2])
            parts.append("</details>")

    for b in doc:
        block(b)
    parts.append("</body></html>\n")
    return "".join(parts)


def write_pages(out: Path, stem: str, doc, title: str, figs: dict) -> tuple[Path, Path]:
    """The drafted figures into `<out>/figures/`, then `<out>/<stem>.md` and `<out>/<stem>.html`:
    all of them or none (a failure part way puts back the files it replaced, and removes the
    folders it made). `figs` (name -> draft path) is updated to the final paths."""
    page_text = _html(doc, title, {k: Path(v) for k, v in figs.items()})
    figdir = out / "figures"
    made = [d for d in (figdir, *figdir.parents) if not d.exists()]  # to remove again on a failure
    try:
        (figdir if figs else out).mkdir(parents=True, exist_ok=True)  # no empty figures/ for a page without any
    except OSError as e:
        raise MeestralError(f"cannot write the report to {out} ({e.strerror}): choose another output folder") from None
    final = {k: figdir / Path(v).name for k, v in figs.items()}
    writes = {final[k]: (lambda t, v=v: shutil.copyfile(v, t)) for k, v in figs.items()}
    md, page = out / f"{stem}.md", out / f"{stem}.html"
    writes[md] = lambda t: t.write_text(_markdown(doc, title, final, out), encoding="utf-8")
    writes[page] = lambda t: t.write_text(page_text, encoding="utf-8")
    try:
        write_together(writes)
    except BaseException:
        for d in made:  # innermost first; a folder someone else wrote into meanwhile stays
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
        raise
    figs.update(final)
    return page, md


def write_report(results_dir, out_dir=None, title: str = "MEEstral early-exit report",
                 x: str = "weight_bytes_ratio") -> tuple[Path, Path]:
    """Figures into `<out>/figures/*.png`, then `<out>/report.html` and `<out>/report.md`
    (default out: the results folder itself). Each file is written whole or not at all; a failure
    while plotting leaves any previous report as it was."""
    if x not in plots.X_AXES:
        raise MeestralError(f"unknown compute axis {x!r}: use one of {', '.join(plots.X_AXES)}")
    res = load_results(results_dir)
    out = Path(out_dir).expanduser() if out_dir else res["dir"]
    figdir = out / "figures"
    drafts = Path(tempfile.mkdtemp(prefix="meestral-figures-"))  # into figures/ only with the whole report
    try:
        doc, figs = [], {}
        sections = [("sweep.jsonl", lambda: _intro(doc, res, x)),
                    ("sweep.jsonl and oracle.json", lambda: _tradeoff(doc, res, figs, drafts, x)),
                    ("sweep.jsonl", lambda: _thresholds(doc, res, figs, drafts)),
                    ("oracle.json", lambda: _oracle(doc, res, figs, drafts)),
                    ("calibration.json", lambda: _calibration(doc, res, figs, drafts)),
                    ("train/log.jsonl", lambda: _training(doc, res, figs, drafts)),
                    ("lens.json", lambda: _lens(doc, res, figs, drafts)),
                    ("sweep.jsonl", lambda: _all_points(doc, res))]
        for inputs, build in sections:
            try:
                build()
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                one = " and " not in inputs
                raise MeestralError(f"{inputs} in {res['dir']} {'does' if one else 'do'} not hold what MEEstral writes "
                                    f"({type(e).__name__}: {str(e)[:120]}): rerun the command that wrote "
                                    f"{'it, or remove the file' if one else 'them'}") from None
        page, md = write_pages(out, "report", doc, title, figs)
    finally:
        shutil.rmtree(drafts, ignore_errors=True)
    for name in FIGURES:  # a figure of an earlier report whose input is gone would mislead
        if name not in figs:
            (figdir / f"{name}.png").unlink(missing_ok=True)
    return page, md


def main_tradeoff_png(results_dir, dest, x: str = "weight_bytes_ratio") -> Path:
    """Just the main figure (quality against compute), written to `dest`."""
    res = load_results(results_dir)
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return plots.tradeoff(res["sweep"], res["oracle"], dest, x=x)
