"""Several backbones' reports on one page: what `meestral demo` writes beside the per-backbone
reports when it runs more than one backbone (by default SmolLM2 and the Mamba-2 `mamba2-smol`).

    from meestral.report.compare import write_comparison
    write_comparison({"smollm2": "out/demo-report/smollm2", "mamba2-smol": "out/demo-report/mamba2-smol"},
                     "out/demo-report")   # -> comparison.html, comparison.md, figures/compare-*.png

The same blocks and writers as `report.render` (so the page reads like the reports it sums up):
the oracle curves of all backbones on one plot (agreement with the final layer by depth fraction,
held-out text), every backbone's quality-against-compute panels in one figure, and one table per
task with each backbone's full-depth score, its best early exit within one point and its bound.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from meestral.errors import MeestralError
from meestral.report import plots
from meestral.report.plots import baseline
from meestral.report.render import _bound, _f, _score, _setting, best_early_exit, load_results, write_pages


def _backbone(res) -> str:
    return res["sweep"][0]["config"].get("backbone")


def write_comparison(reports: dict, out, title: str = "MEEstral demo: the embedded backbones side by side",
                     text_source: str = "embedded") -> tuple[Path, Path]:
    if len(reports) < 2:
        raise MeestralError("a comparison needs the reports of at least two backbones")
    res = {name: load_results(d) for name, d in reports.items()}
    out = Path(out).expanduser()
    drafts = Path(tempfile.mkdtemp(prefix="meestral-compare-"))
    try:
        doc, figs = [], {}
        doc.append(("p", "Each backbone has its own full report next to this page (" +
                    ", ".join(f"`{Path(d).name}/report.html` / `.md`" for d in reports.values()) +
                    "). Compute is per emitted token relative to the same backbone at full depth; a layer ratio "
                    "is not a wall-clock speed-up. Scores carry their standard error: on small task slices most "
                    "differences between settings are within it. A backbone's oracle strict bound depends on the "
                    "text it is measured on, so every bound below names its text and token count: the figure's "
                    f"are on held-out text (`{text_source}`), the tables' on each task's own documents."))
        sources = {}
        for name, r in res.items():
            src = plots.oracle_source(r["oracle"], text_source)
            if src is not None:
                sources[name] = dict(src, num_layers=src.get("num_layers") or (r["oracle"] or {}).get("num_layers"))
        if sources:
            doc.append(("h", 2, "Where each backbone settles"))
            figs["compare_oracle"] = plots.oracle_compare(sources, drafts / "compare-oracle.png",
                                                          title=f"held-out text ({text_source})", source=text_source)
            doc.append(("fig", "compare_oracle", "Top-1 agreement of each layer with the final layer against depth "
                                                 "as a fraction of the backbone's layers; the legend gives each strict "
                                                 "oracle bound (the most a token-identical exit could save, in layers) "
                                                 f"on this held-out text ({text_source})."))
        rows = [row for r in res.values() for row in r["sweep"]]
        oracle = {"by_backbone": {_backbone(r): r["oracle"] for r in res.values()}}
        doc.append(("h", 2, "Quality against compute"))
        figs["compare_tradeoff"] = plots.tradeoff(rows, oracle, drafts / "compare-tradeoff.png")
        doc.append(("fig", "compare_tradeoff", "Task metric against weight bytes per token (relative to the same "
                                               "backbone at full depth), a panel per task and backbone: lines per "
                                               "policy over thresholds, static-exit and layer-drop baselines, the "
                                               "full model (dashed), the oracle strict bound (red)."))
        tasks = sorted({row["task"] for row in rows})
        for task in tasks:
            doc.append(("h", 3, task))
            table = []
            for name, r in res.items():
                prs = [row for row in r["sweep"] if row["task"] == task]
                full = plots.full_row(prs)
                if full is None:
                    continue
                src = plots.oracle_source(r["oracle"], task)
                label = plots.series_labeler(r["sweep"])
                best, none = best_early_exit([row for row in prs if baseline(row) is None], full)
                table.append([name, full.get("num_layers") or "", _score(full), _bound(src, task) if src else _bound(src),
                              _setting(best, label) if best else none,
                              _score(best) if best else "", _f(best.get("weight_bytes_ratio")) if best else "",
                              _f(best.get("layer_fraction")) if best else "",
                              _f(best.get("agreement")) if best else ""])
            metric = next((row.get("metric", "score") for row in rows if row["task"] == task), "score")
            doc.append(("table", ["backbone", "layers", f"full model {metric}", "oracle strict bound (on this task)",
                                  "best early exit within 1 point", metric, "weight bytes / full",
                                  "layers run / full", "agreement with full"], table))
        page, md = write_pages(out, "comparison", doc, title, figs)
    finally:
        shutil.rmtree(drafts, ignore_errors=True)
    return page, md
