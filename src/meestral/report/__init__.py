"""Plots and the HTML/Markdown report of a results folder (sweep, oracle, calibration, lens, training)."""

from meestral.report.render import load_results, main_tradeoff_png, write_report

__all__ = ["load_results", "main_tradeoff_png", "write_report"]
