"""Plots and the HTML/Markdown report of a results folder (sweep, oracle, calibration, lens, training).

    plots.py    one function per figure
    render.py   the report of one backbone's results (HTML + Markdown)
    compare.py  several backbones' reports on one page
    text.py     model text as people read it (invisible characters drawn, "…" where cut)
"""

from meestral.report.render import load_results, main_tradeoff_png, write_report

__all__ = ["load_results", "main_tradeoff_png", "write_report"]
