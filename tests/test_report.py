"""The report: figures, self-contained HTML, Markdown, tables from the inputs, missing inputs,
bad inputs, atomic output."""

import json
import re

import numpy as np
import pytest
import torch

from meestral.errors import MeestralError
from meestral.files import atomic_write
from meestral.evaluation.calibration import calibrate
from meestral.evaluation.oracle import oracle_summary
from meestral.report import main_tradeoff_png, plots, render, write_report
from meestral.training.head_training import binary_metrics
from meestral.training.run_log import RunLog

PNG = b"\x89PNG\r\n\x1a\n"
L = 30
ALL_FIGURES = {"tradeoff", "agreement", "exit_histograms", "oracle", "calibration", "training", "lens", "drift"}


def row(task, value, *, policy=None, baseline=None, threshold=None, layer=None, wb=1.0, agreement=1.0,
        exit_rate=0.0, stderr=0.02, ms=10.0, hist=None):
    cfg = {"backbone": "smollm2", "fingerprint": "abc123", "heads": "classifier:/runs/h/heads", "exits": [7, 15, 22],
           "policy": policy, "baseline": baseline, "threshold": threshold, "layer": layer, "task": task,
           "limit": 200, "exit_output": "hidden"}
    return {"key": json.dumps(cfg, sort_keys=True), "config": cfg, "task": task, "metric": "acc", "value": value,
            "stderr": stderr, "metrics": {"acc": value, "acc_norm": value}, "agreement": agreement,
            "mean_exit_layer": wb * L, "mean_layers_run": wb * L + 1, "layer_fraction": wb, "exit_rate": exit_rate,
            "flops_per_token": 1e8 * wb, "flops_ratio": wb, "weight_bytes_per_token": 4e8 * wb,
            "weight_bytes_ratio": wb, "ms_per_token": ms, "wall_s": 3.0, "tokens": 1234, "num_layers": L,
            "exit_histogram": hist or {"7": 10, "15": 30, "29": 500}, "time": "2026-11-29T01:00:00Z"}


def sweep_rows():
    # arc: one point is cheapest within 1 point of the full 0.55 (copy @ 0.8, weight bytes 0.6789);
    # copy @ 0.5 is cheaper but 15 points worse, so it must not be chosen.
    rows = [row("meestral_arc_easy", 0.55, baseline="full", ms=12.0),
            row("meestral_arc_easy", 0.40, policy="copy", threshold=0.5, wb=0.50, agreement=0.6, exit_rate=0.7),
            row("meestral_arc_easy", 0.545, policy="copy", threshold=0.8, wb=0.6789, agreement=0.9, exit_rate=0.4,
                ms=9.0),
            row("meestral_arc_easy", 0.552, policy="copy", threshold=0.95, wb=0.90, agreement=0.97, exit_rate=0.1),
            {**row("meestral_arc_easy", 0.55, policy="verify", threshold=0.5, wb=1.37, exit_rate=0.5),
             "draft_acceptance": 0.4217, "rolled_back": 17},
            row("meestral_arc_easy", 0.55, policy="verify", threshold=0.9, wb=0.97, exit_rate=0.2)]  # an old row
    for task, full in (("meestral_arc_easy", 0.55), ("meestral_piqa", 0.62)):
        if task != "meestral_arc_easy":
            rows.append(row(task, full, baseline="full"))
            for policy in ("copy", "propagate", "catchup"):
                for t in (0.5, 0.7, 0.9):
                    rows.append(row(task, full - (1 - t) * 0.1, policy=policy, threshold=t, wb=0.6 + 0.4 * t,
                                    agreement=t, exit_rate=1 - t, hist={"7": int(100 * (1 - t)), "29": 100}))
        for layer in (7, 15, 22):
            rows.append(row(task, full * layer / L, baseline="static", layer=layer, wb=(layer + 1) / L))
        for layer in (2, 4):
            rows.append(row(task, full - 0.05 * layer, baseline="layer_drop", layer=layer, wb=1 - layer / L))
    return rows


SWEEP_HEADER = {"meestral_sweep": 1, "backbone": "smollm2", "fingerprint": "abc123", "heads": "classifier:/runs/h/heads",
                "exits": [7, 15, 22], "limit": 200}  # the first line evaluation.sweep.ResultsTable writes


def oracle_source(seed):
    """An oracle source as evaluation.oracle.oracle_summary writes it (strict and top-k)."""
    rng = np.random.default_rng(seed)
    layers, n = [7, 15, 22, 27], 400
    final = rng.integers(0, 50, n)
    hit = rng.random((n, len(layers))) < np.array([0.1, 0.2, 0.4, 0.6])
    la = np.where(hit, final[:, None], 50)
    return oracle_summary(la, final, layers, L, in_topk=hit | (rng.random(hit.shape) < 0.3), topk=15)


def write_results(d, *, optional=True, rows=None):
    """A results folder; the optional files come from the producers' own code where it exists."""
    d.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows() if rows is None else rows
    (d / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [SWEEP_HEADER] + rows))
    if not optional:
        return d
    oracle = {"num_layers": L, "sources": {"embedded": oracle_source(0), "meestral_arc_easy": oracle_source(1)}}
    (d / "oracle.json").write_text(json.dumps(oracle))
    rng = np.random.default_rng(2)
    conf = rng.random((3000, 3))
    agree = np.concatenate([rng.random((3000, 3)) < 0.5 + 0.5 * conf, np.ones((3000, 1), bool)], axis=1)
    cal = calibrate(conf[:2000], agree[:2000], 0.1, 0.1, layers=[7, 15, 22], num_layers=L).to_dict()
    cal.update({"heldout_agreement": 0.91, "heldout_exit_rate": 0.2, "heldout_n": 1000})  # as `meestral calibrate` adds
    (d / "calibration.json").write_text(json.dumps(cal))
    # As evaluation.lens.logit_lens writes it: every layer, the final one included; drift over 1..L-2.
    toks = ["The", " cat", " $x$", "\n", " sat"] * 2
    layers = list(range(8))
    (d / "lens.json").write_text(json.dumps(
        {"tokens": toks, "layers": layers, "top_tokens": [[f"t{l}{j}" for j in range(len(toks))] for l in layers],
         "agree_final": [[(l + j) % 3 == 0 or l == 7 for j in range(len(toks))] for l in layers],
         "confidence": {"3": [0.1 * (j % 10) for j in range(len(toks))], "5": [0.5] * len(toks)},
         "head_kind": "classifier",
         "drift": {"layers": layers[1:-1], "cosine": [0.9] * 6, "norm": [float(l) for l in layers[1:-1]]}}))
    # The trainer's own log writer, with its own metrics: the report must read the real format.
    (d / "train").mkdir()
    log = RunLog(d / "train", None)
    g = torch.Generator().manual_seed(0)
    for step in (10, 20):
        heads = {str(l): binary_metrics(torch.randn(64, generator=g), torch.rand(64, generator=g) > 0.5)
                 for l in (7, 15)}
        log.write({"split": "train", "step": step, "tokens": step * 64, "loss": 1.0 / step, "lr": 1e-3,
                   "tok_per_s": 100.0, "heads": heads})
        log.write({"split": "val", "step": step, "tokens": step * 64, "heads": heads})
    log.close()
    return d


def pngs(out):
    return sorted((out / "figures").glob("*.png"))


def check_self_contained(html_path, n_figures):
    page = html_path.read_text()
    assert page.count('<img src="data:image/png;base64,') == n_figures
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    return page


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    d = write_results(tmp_path_factory.mktemp("results") / "res")
    return d, write_report(d)


def test_full_report_has_every_figure_inline_and_valid(full_report):
    d, (html_path, md_path) = full_report
    out = d
    assert (html_path, md_path) == (out / "report.html", out / "report.md")
    files = pngs(out)
    assert {p.stem for p in files} == ALL_FIGURES
    for p in files:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    check_self_contained(html_path, len(ALL_FIGURES))
    md = md_path.read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == len(ALL_FIGURES)
    assert all((out / r).is_file() for r in refs)
    assert "Not run" not in md and "Not run" not in html_path.read_text()


def test_tables_carry_the_input_values(full_report):
    d, (html_path, md_path) = full_report
    md, page = md_path.read_text(), html_path.read_text()
    for doc in (md, page):
        assert "0.55 ± 0.02" in doc  # the arc full-model score
        assert "0.62 ± 0.02" in doc  # the piqa full-model score
        arc_bound = json.loads((d / "oracle.json").read_text())["sources"]["meestral_arc_easy"]["bound_speedup_layers"]
        assert f"{arc_bound:.2f}× in layers" in doc  # the oracle bound, next to the speed-ups
        cal = json.loads((d / "calibration.json").read_text())
        assert f"Chosen threshold: {cal['threshold']:.4g}" in doc and "0.910" in doc  # held-out agreement
    best = md.split("### meestral_arc_easy")[1].split("###")[0]
    assert "Best early exit within 1 point: copy, threshold 0.8" in best
    assert "0.679" in best and "1.33× wall-clock" in best  # its weight bytes; 12 ms against 9 ms
    assert "Oracle strict bound: not run on this task" in md.split("### meestral_piqa")[1]
    # The trainer's last validation F1 of head 7.
    last = [json.loads(x) for x in (d / "train" / "log.jsonl").read_text().splitlines()][-1]
    assert f"{last['heads']['7']['f1']:.3f}" in md


def test_verify_points_state_their_draft_acceptance(full_report):
    _, (html_path, md_path) = full_report
    for doc in (md_path.read_text(), html_path.read_text()):
        arc = doc.split("meestral_arc_easy: ")[1]  # the all-points table of the task
        assert "0.422 (17 rolled back)" in arc
        # a row written before rejected drafts were priced is marked, not shown as a saving
        assert "not counted (a sweep row from before rejected drafts were priced: rerun it)" in arc
        assert "rolled back at the next deep pass" in doc  # the intro says how verify is priced


def test_speed_ups_always_say_what_they_count(full_report):
    _, (_, md_path) = full_report
    hits = 0
    for line in md_path.read_text().splitlines():
        for hit in re.finditer(r"speed-up", line):
            hits += 1
            context = line[hit.start() - 60:hit.end() + 60]
            assert "in layers" in context or "wall-clock" in context, line
    assert hits >= 2  # the report does state speed-ups (so the check above checked something)


def test_best_within_one_point():
    rows = sweep_rows()
    arc = [r for r in rows if r["task"] == "meestral_arc_easy"]
    full = plots.full_row(arc)
    ee = [r for r in arc if r["config"]["baseline"] is None]
    best = render.best_within(ee, full)
    assert (best["config"]["policy"], best["config"]["threshold"]) == ("copy", 0.8)
    # Ranked by the chosen compute axis, not always weight bytes.
    assert render.best_within(ee, full, "layer_fraction") is best
    # Lower-is-better metrics count "within one point" upwards.
    ppl = dict(full, metric="perplexity", value=10.0)
    worse_but_cheaper = dict(best, value=11.5, weight_bytes_ratio=0.1)
    assert render.best_within([dict(best, value=10.9), worse_but_cheaper], ppl)["value"] == 10.9
    assert render.best_within(ee, dict(full, value=0.9)) is None


def test_missing_optional_inputs_say_not_run(tmp_path):
    d = write_results(tmp_path / "res", optional=False)
    html_path, md_path = write_report(d, tmp_path / "out", title="Only a sweep")
    assert {p.stem for p in pngs(tmp_path / "out")} == {"tradeoff", "agreement", "exit_histograms"}
    check_self_contained(html_path, 3)
    md = md_path.read_text()
    assert md.startswith("# Only a sweep") and md.count("Not run") == 4
    assert "0.55 ± 0.02" in md and "Oracle strict bound: not run (no oracle.json)" in md


def test_rerender_drops_figures_whose_input_is_gone(tmp_path):
    d = write_results(tmp_path / "res", optional=False)
    (d / "oracle.json").write_text(json.dumps({"num_layers": L, "sources": {"embedded": oracle_source(0)}}))
    write_report(d)
    assert (d / "figures" / "oracle.png").exists()
    (d / "oracle.json").unlink()
    write_report(d)
    assert not (d / "figures" / "oracle.png").exists()
    assert "Not run: no oracle.json" in (d / "report.md").read_text()


def test_baselines_only_sweep_renders(tmp_path):
    rows = [r for r in sweep_rows() if r["config"]["baseline"] is not None]
    d = write_results(tmp_path / "res", optional=False, rows=rows)
    html_path, md_path = write_report(d)
    check_self_contained(html_path, 1)
    assert "no early-exit points" in md_path.read_text()


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_or_missing_sweep_is_a_user_error(tmp_path, content):
    (tmp_path / "sweep.jsonl").write_text(content)
    with pytest.raises(MeestralError, match="no sweep results in .*sweep.jsonl: run `meestral sweep` first"):
        write_report(tmp_path)
    (tmp_path / "sweep.jsonl").unlink()
    with pytest.raises(MeestralError, match="no sweep results"):
        write_report(tmp_path)
    with pytest.raises(MeestralError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def test_bad_json_lines(tmp_path):
    good = json.dumps(sweep_rows()[0])
    (tmp_path / "sweep.jsonl").write_text(good + "\n{not json\n" + good + "\n")
    with pytest.raises(MeestralError, match="line 2 is not valid JSON"):
        write_report(tmp_path)
    # An append cut short by a kill (no final newline) is skipped, not fatal.
    (tmp_path / "sweep.jsonl").write_text(good + '\n{"key": "x", "con')
    assert len(render.load_results(tmp_path)["sweep"]) == 1
    with pytest.raises(MeestralError, match="unknown compute axis"):
        write_report(tmp_path, x="tokens")


def test_failure_while_plotting_leaves_no_report(tmp_path, monkeypatch):
    d = write_results(tmp_path / "res")

    def boom(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "agreement", boom)  # the second figure: the first is already on disk
    with pytest.raises(RuntimeError):
        write_report(d)
    out = d
    assert not (out / "report.html").exists() and not (out / "report.md").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # A previous report survives a failed re-render untouched.
    (out / "report.html").write_text("OLD")
    with pytest.raises(RuntimeError):
        write_report(d)
    assert (out / "report.html").read_text() == "OLD"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.png"

    def half(tmp):
        tmp.write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, half)
    assert list(tmp_path.iterdir()) == []


def test_main_tradeoff_png(tmp_path):
    d = write_results(tmp_path / "res", optional=False)
    for x in ("flops_ratio", "layer_fraction"):  # weight bytes: drawn in every report
        p = main_tradeoff_png(d, tmp_path / "docs" / f"tradeoff_{x}.png", x=x)
        assert p.read_bytes()[:8] == PNG
    assert not (d / "report.html").exists() and not (d / "figures").exists()  # only the figure


def test_reads_the_briefs_oracle_and_calibration_shapes(tmp_path):
    """Agreement as a list over `layers` and `bound_speedup`; a calibration that certified nothing."""
    d = write_results(tmp_path / "res", optional=False)
    src = {"layers": [7, 15], "agreement": [0.1, 0.3], "exit_histogram": {"7": 3, "29": 90}, "mean_layers_run": 26.4,
           "layer_fraction": 0.88, "bound_speedup": 1.136, "tokens": 3000, "num_layers": L}
    (d / "oracle.json").write_text(json.dumps({"sources": {"meestral_arc_easy": src}}))
    grid = [{"threshold": t, "risk": 0.3, "p_value": 0.9, "rejected": False} for t in (1.0, 0.5)]
    (d / "calibration.json").write_text(json.dumps({"epsilon": 0.1, "delta": 0.1, "method": "binomial",
                                                    "threshold": 1.0, "n": 50, "grid": grid}))
    html_path, md_path = write_report(d)
    check_self_contained(html_path, 5)
    md = md_path.read_text()
    assert "Oracle strict bound: 1.14× in layers (layer fraction 0.880)" in md
    assert "Chosen threshold: none certified" in md


def test_comparison_sets_backbones_side_by_side(tmp_path):
    """Two backbones' results (the second a 24-layer Mamba-2 with its own scores and oracle): one
    page with both oracle curves on one plot, every backbone's panels, and per task a row per
    backbone carrying that backbone's own numbers."""
    from meestral.report.compare import write_comparison

    a = write_results(tmp_path / "smollm2")
    rows = []
    for r in sweep_rows():
        r = json.loads(json.dumps(r))
        r["config"]["backbone"] = "mamba2-smol"
        r["key"] = json.dumps(r["config"], sort_keys=True)
        r["value"] = round(r["value"] - 0.1, 4)
        rows.append(r)
    b = write_results(tmp_path / "mamba2-smol", rows=rows)
    oracle = json.loads((b / "oracle.json").read_text())
    oracle["num_layers"] = 24
    oracle["sources"]["embedded"]["bound_speedup_layers"] = 1.55
    (b / "oracle.json").write_text(json.dumps(oracle))
    page, md = write_comparison({"smollm2": a, "mamba2-smol": b}, tmp_path)
    check_self_contained(page, 2)
    text = md.read_text()
    assert "figures/compare-oracle.png" in text and "figures/compare-tradeoff.png" in text
    arc = text[text.index("### meestral_arc_easy"):text.index("### meestral_piqa")]
    lines = [l for l in arc.splitlines() if l.startswith("| smollm2") or l.startswith("| mamba2-smol")]
    assert len(lines) == 2
    assert "0.55 ±" in lines[0] and "0.45 ±" in lines[1]  # each backbone's own full score
    assert "1.55× in layers" not in lines[0] and "1.55×" not in arc.split("| mamba2-smol")[0]
    with pytest.raises(MeestralError, match="at least two"):
        write_comparison({"smollm2": a}, tmp_path / "one")


def test_tradeoff_reads_each_backbones_own_oracle():
    src_a, src_b = {"layer_fraction": 0.8}, {"layer_fraction": 0.6}
    oracle = {"by_backbone": {"a": {"sources": {"t": src_a}}, "b": {"sources": {"t": src_b}}}}
    assert plots.oracle_source(oracle, "t", "a") is src_a and plots.oracle_source(oracle, "t", "b") is src_b
    assert plots.oracle_source({"sources": {"t": src_a}}, "t", "b") is src_a  # one backbone: as before
