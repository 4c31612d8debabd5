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
from meestral.report.text import shorten
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
