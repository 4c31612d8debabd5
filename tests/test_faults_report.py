"""Issue 21, the sweep table, the report and its figures: `sweep` never loses a stored row, `report`
on bad bytes is one line, a report or a comparison is written whole or not at all (no empty
figures/ folder), and the report says only what is true (a headline that exits, panels that draw,
each oracle bound with the text it was measured on, readable text)."""

import json
import os

import pytest

from meestral.cli.main import main
from meestral.errors import MeestralError
from meestral.files import atomic_write
from meestral.evaluation.sweep import ResultsTable
from meestral.report import plots, render, write_report
from test_cli import assert_one_line_error
from test_report import SWEEP_HEADER, row, sweep_rows, write_results

HEADER = {k: v for k, v in SWEEP_HEADER.items() if k != "meestral_sweep"}


# ---- the sweep table never loses a stored row ------------------------------------------------------
def table(path, n=9):
    """A sweep table of n rows written by the sweep's own writer."""
    t = ResultsTable(path, HEADER)
    for i in range(n):
        t.append({"key": f"k{i}", "value": i})
    t.close()
    return [f"k{i}" for i in range(n)]


def stored(path):
    """The keys of the rows on whole lines, after checking that no two rows are glued on one line."""
    text = path.read_text()
    assert text.endswith("\n"), "the file must end with a whole line"
    rows = [json.loads(line) for line in text.split("\n")[1:-1] if line.strip()]
    return [r["key"] for r in rows]


def reopen(path):
    t = ResultsTable(path, HEADER)
    t.close()
    return t


def test_a_garbled_middle_line_is_refused_and_nothing_is_cut(tmp_path):
    path = tmp_path / "sweep.jsonl"
    table(path)
    lines = path.read_text().split("\n")
    lines[4] = lines[4][:1] + "XX" + lines[4][1:]  # row 4 of 9 (line 5)
    path.write_text("\n".join(lines))
    before = path.read_bytes()
    for _ in range(2):  # a rerun after the refusal is refused again, the file untouched
        with pytest.raises(MeestralError, match=r"sweep.jsonl line 5 is not a sweep row \(invalid JSON"):
            reopen(path)
        assert path.read_bytes() == before
    lines[4] = json.dumps({"key": "k3", "value": 3})  # once the line is mended, every row is there
    path.write_text("\n".join(lines))
    assert sorted(reopen(path).rows) == [f"k{i}" for i in range(9)]


@pytest.mark.parametrize("bad", [b"[1, 2]", b'{"value": 1}', b"\xff\xfe{}", b"null"])
def test_lines_that_are_not_rows_are_named_with_their_numbers(tmp_path, bad):
    path = tmp_path / "sweep.jsonl"
    table(path, 3)
    raw = path.read_bytes().split(b"\n")
    raw[2:2] = [bad]
    raw[4:4] = [bad]
    path.write_bytes(b"\n".join(raw))
    with pytest.raises(MeestralError, match=r"lines 3, 5 are not sweep rows \(line 3: .*\): delete those lines"):
        reopen(path)
    assert path.read_bytes() == b"\n".join(raw)


def test_blank_lines_lose_no_row_over_reruns(tmp_path):
    path = tmp_path / "sweep.jsonl"
    keys = table(path)
    lines = path.read_text().split("\n")
    lines[4:4] = ["", "  "]
    path.write_text("\n".join(lines))
    for n in range(3):  # three reruns, each appending one point
        t = ResultsTable(path, HEADER)
        assert sorted(t.rows) == sorted(keys)
        t.append({"key": f"new{n}", "value": n})
        t.close()
        keys.append(f"new{n}")
        assert sorted(stored(path)) == sorted(keys)


def test_a_last_row_without_its_newline_is_kept_and_not_glued_onto(tmp_path):
    path = tmp_path / "sweep.jsonl"
    keys = table(path)
    path.write_bytes(path.read_bytes()[:-1])  # e.g. saved by an editor that drops the final newline
    t = ResultsTable(path, HEADER)
    assert sorted(t.rows) == sorted(keys)
    t.append({"key": "new", "value": 1})
    t.close()
    assert sorted(stored(path)) == sorted(keys + ["new"])


def test_half_a_row_from_a_kill_is_dropped_alone(tmp_path):
    path = tmp_path / "sweep.jsonl"
    keys = table(path)
    path.write_bytes(path.read_bytes() + b'{"key": "k9", "val')
    t = ResultsTable(path, HEADER)
    t.append({"key": "k9", "value": 9})
    t.close()
    assert stored(path) == keys + ["k9"]


def test_sweep_command_refuses_a_garbled_table_in_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.jsonl"
    table(path, 4)
    lines = path.read_text().split("\n")
    lines[2] = "{garbled"
    path.write_text("\n".join(lines))
    before = path.read_bytes()
    rc = main(["sweep", "--backbone", "random:mistral", "--exits", "1,3", "--head", "softmax", "--tasks", "arc_easy",
               "--limit", "1", "--thresholds", "0.5", "--policies", "copy", "--out", str(path)])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, [str(path), "line 3 is not a sweep row", "delete that line"])
    assert path.read_bytes() == before


# ---- report on bytes that are not UTF-8 ------------------------------------------------------------
@pytest.mark.parametrize("name", ["sweep.jsonl", "oracle.json"])
def test_report_on_non_utf8_names_file_and_offset(tmp_path, capsys, name):
    d = write_results(tmp_path / "res", optional=False)
    if name == "oracle.json":
        (d / name).write_bytes(b'{"sources": {}}')
    raw = (d / name).read_bytes()
    at = raw.index(b"\n") + 10 if b"\n" in raw else 5
    (d / name).write_bytes(raw[:at] + b"\xff" + raw[at:])
    rc = main(["report", "--results", str(d)])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, [str(d / name), "is not UTF-8", f"byte 0xff at offset {at}"])
    assert sorted(os.listdir(d)) == sorted(["sweep.jsonl"] + ([name] if name != "sweep.jsonl" else []))


def test_report_skips_a_cut_last_line_even_inside_a_character(tmp_path):
    d = write_results(tmp_path / "res", optional=False)
    (d / "sweep.jsonl").write_bytes((d / "sweep.jsonl").read_bytes() + b'{"key": "\xe2\x82')  # half of a "€"
    assert len(render.load_results(d)["sweep"]) == len(sweep_rows())


# ---- written whole or not at all -------------------------------------------------------------------
def test_a_failed_report_leaves_no_figures_folder_and_puts_back_what_it_replaced(tmp_path, monkeypatch):
    d = write_results(tmp_path / "res", optional=False)
    out = tmp_path / "new" / "report"

    def fail_on_page(path, write):
        if path.name.endswith(".html"):
            raise OSError(28, "No space left on device", str(path))
        return atomic_write(path, write)

    monkeypatch.setattr("meestral.files.atomic_write", fail_on_page)
    with pytest.raises(OSError):
        write_report(d, out)
    assert not (tmp_path / "new").exists()  # nor figures/ nor the folders the report made
    monkeypatch.undo()
    write_report(d)
    files = lambda: {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "sweep.jsonl"}  # noqa: E731
    before = files()
    monkeypatch.setattr("meestral.files.atomic_write", fail_on_page)
    (d / "sweep.jsonl").write_text((d / "sweep.jsonl").read_text().replace('"value": 0.55', '"value": 0.5'))
    with pytest.raises(OSError):
        write_report(d)
    assert files() == before  # the previous report and its figures, as they were


# ---- the headline names only a setting that exits --------------------------------------------------
def idle_sweep():
    """ARC-Easy where the only early-exit settings within one point of the full 0.55 never exit (as
    the README's 0.7 threshold did with the demo's heads), and the one that exits is 15 points worse."""
    return [row("meestral_arc_easy", 0.55, baseline="full"),
            row("meestral_arc_easy", 0.55, policy="catchup", threshold=0.7, wb=1.001, exit_rate=0.0),
            row("meestral_arc_easy", 0.55, policy="catchup", threshold=0.9, wb=1.001, exit_rate=0.0),
            row("meestral_arc_easy", 0.40, policy="catchup", threshold=0.3, wb=0.6, exit_rate=0.8)]


def test_the_headline_never_names_a_setting_that_does_not_exit(tmp_path):
    d = write_results(tmp_path / "res", optional=False, rows=idle_sweep())
    _, md_path = write_report(d)
    md = md_path.read_text()
    assert "Best early exit within 1 point: catchup" not in md
    assert "Best early exit within 1 point: none. The 2 early-exit setting(s) within 1 point" in md
    assert "never exit (exit rate 0)" in md
    table = next(l for l in md.splitlines() if l.startswith("| best early exit within 1 point"))
    assert "none that exits within 1 point" in table and "threshold" not in table
    full = plots.full_row(idle_sweep())
    assert render.best_early_exit(idle_sweep(), full) == (None, "none that exits within 1 point")
    assert render.best_early_exit(idle_sweep()[3:], full) == (None, "none within 1 point")


def test_the_headline_never_names_a_setting_that_costs_the_full_models_bytes(tmp_path):
    """A setting that exits but reads at least the full model's bytes (verify re-runs what its exits
    skipped: the demo's SmolLM2 verify at 0.4 read 2.8x) saves nothing: no headline names it, and
    the sentence says why; a cheaper one that exits is named."""
    rows = idle_sweep()[:3]
    rows[1]["weight_bytes_ratio"] = 0.99  # cheaper on paper, but it never leaves early
    dear = row("meestral_arc_easy", 0.548, policy="verify", threshold=0.4, wb=2.8, exit_rate=0.3)
    full = plots.full_row(rows)
    assert render.best_early_exit(rows + [dear], full) == (None, "none that saves compute within 1 point")
    d = write_results(tmp_path / "res", optional=False, rows=rows + [dear])
    md = write_report(d)[1].read_text()
    assert "Best early exit within 1 point: none that saves compute. The 1 setting(s)" in md
    assert "verify, threshold 0.4, 2.800 of its weight bytes" in md
    saving = row("meestral_arc_easy", 0.546, policy="catchup", threshold=0.5, wb=0.8, exit_rate=0.2)
    assert render.best_early_exit(rows + [dear, saving], full) == (saving, "")
    assert "(no fewer than the full model)" in render._best_sentence(dear, rows[0], None, lambda r: "verify", "acc")


def test_the_comparison_table_says_when_no_setting_exits(tmp_path):
    from meestral.report.compare import write_comparison

    a = write_results(tmp_path / "smollm2")
    b = write_results(tmp_path / "mamba2-smol", rows=[mamba(r) for r in idle_sweep()])
    _, md = write_comparison({"smollm2": a, "mamba2-smol": b}, tmp_path)
    line = next(l for l in md.read_text().splitlines() if l.startswith("| mamba2-smol"))
    assert "none that exits within 1 point" in line and "threshold" not in line


# ---- every oracle bound says which text it was measured on ------------------------------------------
def mamba(r):
    r = json.loads(json.dumps(r))
    r["config"]["backbone"] = "mamba2-smol"
    r["key"] = json.dumps(r["config"], sort_keys=True)
    return r


@pytest.fixture
def drawn(monkeypatch):
    """The figures plots draws, by file name, kept open for inspection after they are saved."""
    figs = {}
    save = plots._save

    def keep(fig, path):
        figs[os.path.basename(str(path))] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def test_comparison_bounds_name_their_text_and_tokens(tmp_path, drawn):
    """The demo's comparison gave mamba2-smol two bounds (1.46x in the figure, 1.67x in the table)
    measured on different texts: each must say which."""
    from meestral.report.compare import write_comparison

    a = write_results(tmp_path / "smollm2")
    b = write_results(tmp_path / "mamba2-smol", rows=[mamba(r) for r in sweep_rows()])
    oracle = json.loads((b / "oracle.json").read_text())
    oracle["sources"]["embedded"].update(bound_speedup_layers=1.46, tokens=256)
    oracle["sources"]["meestral_arc_easy"].update(bound_speedup_layers=1.67, tokens=1234)
    (b / "oracle.json").write_text(json.dumps(oracle))
    _, md = write_comparison({"smollm2": a, "mamba2-smol": b}, tmp_path)
    text = md.read_text()
    arc = text[text.index("### meestral_arc_easy"):text.index("### meestral_piqa")]
    line = next(l for l in arc.splitlines() if l.startswith("| mamba2-smol"))
    assert "1.67× in layers on meestral_arc_easy (1,234 tokens)" in line
    legend = [t.get_text() for t in drawn["compare-oracle.png"].axes[0].get_legend().get_texts()]
    assert any("1.46x in layers on embedded (256 tokens)" in t for t in legend), legend
    tradeoff = [t.get_text() for ax in drawn["compare-tradeoff.png"].axes if ax.get_legend()
                for t in ax.get_legend().get_texts()]
    assert any("oracle (strict) bound on meestral_arc_easy (1,234 tokens)" in t for t in tradeoff), tradeoff


def test_the_reports_task_bound_names_its_text(tmp_path):
    d = write_results(tmp_path / "res")
    n = json.loads((d / "oracle.json").read_text())["sources"]["meestral_arc_easy"]["tokens"]
    _, md = write_report(d)
    assert f"measured on meestral_arc_easy ({n:,} tokens)." in md.read_text()


# ---- panels draw what they say ---------------------------------------------------------------------
def test_training_panels_draw_a_single_record(tmp_path, drawn):
    """A short run logs one train and one val record: every panel must still show its point."""
    d = write_results(tmp_path / "res")
    log = [json.loads(x) for x in (d / "train" / "log.jsonl").read_text().splitlines()]
    plots.training([r for r in log if r["step"] == 10], tmp_path / "training.png")
    for ax in drawn["training.png"].axes:
        lines = [l for l in ax.get_lines() if len(l.get_xdata()) == 1]
        assert lines, ax.get_title()
        # a real marker: none, or a pixel/point marker, leaves one point invisible or nearly
        assert all(l.get_marker() not in (None, "", "None", " ", ",", ".") and l.get_markersize() >= 3 for l in lines)


# ---- readable text ---------------------------------------------------------------------------------
def test_logit_lens_cells_are_readable(tmp_path, drawn):
    toks = ["The", "\n", " ", " capital", "supercalifragilistic", " $x$"] * 7  # 42: two blocks of 21
    layers = list(range(30))
    lens = {"tokens": toks, "layers": layers, "top_tokens": [toks for _ in layers],
            "agree_final": [[True] * len(toks) for _ in layers], "confidence": {"7": [0.5] * len(toks)}}
    plots.lens(lens, tmp_path / "lens.png")
    fig = drawn["lens.png"]
    assert fig.get_size_inches()[0] * plots.DPI <= plots.PAGE_PX  # shown unscaled on the report page
    cells = [t for ax in fig.axes for t in ax.texts]
    assert len(cells) == len(toks) * len(layers)  # every token drawn, none dropped
    assert all(t.get_fontsize() >= 7 for t in cells)
    assert {t.get_text() for t in cells} == {"The", "⏎", "␣", "capital", "superc…", r"\$x\$"}  # no reprs, "…" where cut
    ticks = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert ticks[:6] == ["The", "⏎", "␣", "capital", "supercali…", r"\$x\$"] and len(ticks) == 21
    assert fig.axes[-1].get_xlabel() == "input tokens 22-42 of 42"


def test_the_lens_sample_text_is_drawn_and_cut_with_an_ellipsis(tmp_path):
    d = write_results(tmp_path / "res")
    lens = json.loads((d / "lens.json").read_text())
    lens["tokens"] = ["To be,\n", "\xa0or not" + " to be" * 10] * 5  # as many as the fixture's other fields
    (d / "lens.json").write_text(json.dumps(lens))
    _, md = write_report(d)
    sample = md.read_text().split("Sample text (10 tokens): “")[1].split("”")[0]
    assert sample.startswith("To be,⏎⍽or not") and sample.endswith("…") and 290 < len(sample) <= 300
    assert "\\n" not in sample and "\\xa0" not in sample


def test_demo_answers_print_readably_with_an_ellipsis():
    from meestral.tools.demo import answer_line

    assert answer_line("softmax > 0.9", "copy", "The" + "\xa0" * 3 + "\n") == "  [softmax > 0.9, copy] The⍽⍽⍽"
    assert answer_line("a", "copy", " \n ") == "  [a, copy]  ⏎ " and answer_line("a", "copy", "") == "  [a, copy] (no text)"
    long = answer_line("full depth", "-", "word " * 40)
    assert long.endswith("…") and len(long.split("] ", 1)[1]) == 110 and "'" not in long


# ---- the README's first example shows early exit working --------------------------------------------
@pytest.mark.slow
def test_the_readmes_first_generate_example_prints_what_the_readme_shows(capsys):
    """The first `meestral generate` of the README, run as written: it exits on some tokens, reads
    fewer weight bytes than full depth, and prints the answer the README shows (greedy, float32)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Generate", 1)[1]
    command = re.search(r"```bash\n(meestral generate [^\n]+)\n```", section).group(1)
    shown = re.search(r"```text\n(.*?)\n\n-- exits", section, re.S).group(1)
    assert main(shlex.split(command)[1:] + ["--no-color"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == shown.strip()
    rate = float(re.search(r"exit rate (\d+)%", err).group(1))
    wbytes = float(re.search(r"weight bytes ([\d.]+)x full", err).group(1))
    assert rate > 0 and wbytes < 1, err
    assert "\xa0" * 3 not in out
