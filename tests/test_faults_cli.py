"""Issue 21's command-line and evaluation faults that the bad-input table (test_validation.CASES)
cannot hold: the size rule on every architecture, lm-eval's help and windows, the cache
variable, and --help's defaults. Each failure is one line, exit 2, nothing written."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meestral import validation
from meestral.cli.main import main, make_parser
from meestral.errors import MeestralError
from test_cli import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent


# ---- one size rule for every architecture -----------------------------------------------------------
def _fit(err: str) -> int:
    return int(re.search(r"at most about ([\d,]+) tokens fit", err).group(1).replace(",", ""))


@pytest.mark.parametrize("shape", ["mamba2", "mistral"])
def test_memory_rule_refuses_past_what_fits_and_accepts_what_it_says_fits(shape, monkeypatch, tmp_path, capsys):
    """With 8 MiB free, a prompt past the estimate is refused in one line saying how many tokens fit;
    that many are then accepted, and a few more refused: the message names the rule's own boundary.
    The same rule on a state-space backbone (no positional limit) and on a Transformer."""
    monkeypatch.setattr(validation, "available_bytes", lambda device: 8 << 20)
    monkeypatch.setattr(validation, "MEMORY_CHECK_FROM", 0)  # the small shapes: check every size here
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--backbone", f"random:{shape}", "--max-new-tokens", "2", "--json"]
    rc = main(argv[:1] + ["x" * 1900] + argv[1:])  # byte tokenizer: 1 BOS + 1,900 + 2 new positions
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, ["a prompt of 1,901 tokens", "GiB", "free", "tokens fit", "shorten the prompt"])
    fit = _fit(err)
    assert 100 < fit < 1900
    assert main(argv[:1] + ["x" * (fit - 3)] + argv[1:]) == 0  # fit - 3 + BOS + 2 = fit positions
    capsys.readouterr()
    assert main(argv[:1] + ["x" * (fit + 3)] + argv[1:]) == 2
    assert _fit(capsys.readouterr().err) == fit
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shape", ["mamba2", "mistral"])
def test_memory_estimate_follows_the_measured_prompt_pass(shape):
    """The fit from 128/256/512 tokens predicts the tensor bytes of a 1,536-token pass within 25%."""
    import torch

    from meestral.backbones.loading import random_backbone
    from meestral.decoding.engine import EagerEngine

    bb = random_backbone(shape)
    a, b, c = validation.prefill_bytes(bb)
    engine, t = EagerEngine(bb), 1536
    state, pad = engine.new_state(1, t + 1), torch.zeros(1, dtype=torch.long)
    measured = validation._peak_tensor_bytes(
        lambda: engine.logits(engine.prefill(torch.zeros(1, t, dtype=torch.long), state, pad)[:, -1]))
    assert measured > 0
    assert abs(a + b * t + c * t * t - measured) / measured < 0.25


@pytest.mark.slow
def test_a_prompt_larger_than_memory_on_mamba2_is_one_line_not_an_oom_kill(tmp_path):
    """Issue 21 fault 2: a prompt file twice what this machine's memory holds for random:mamba2's
    prompt pass (50 MB grew to 22.9 GB and was OOM-killed) is refused before the pass."""
    from meestral.backbones.loading import random_backbone

    bb = random_backbone("mamba2")
    free = validation.available_bytes(bb.device)
    if free is None:
        pytest.skip("free memory unknown here")
    _, per_token, _ = validation.prefill_bytes(bb)
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"x" * max(int(2 * free / per_token), validation.MEMORY_CHECK_FROM))
    p = subprocess.run([sys.executable, "-m", "meestral.cli.main", "generate", "--file", str(prompt), "--backbone",
                        "random:mamba2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert_one_line_error(p.returncode, p.stdout, p.stderr, ["GiB for its prompt pass", "tokens fit"])
    assert os.listdir(tmp_path) == ["prompt.txt"]


# ---- lm-eval -------------------------------------------------------------------------------------------
def test_lm_eval_help_needs_no_gpu_download_or_model(monkeypatch, capsys):
    """`meestral lm-eval --help` printed lm-eval's device error after an 86 MB download."""
    import meestral.evaluation.tasks as tasks
    import meestral.validation as v

    def refuse(*a, **k):
        raise AssertionError("help must not reach this")

    monkeypatch.setattr(tasks, "ensure_tasks", refuse)
    monkeypatch.setattr(v, "check_device", refuse)
    assert main(["lm-eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model meestral" in out and "usage: lm-eval" in out


def test_lm_eval_model_refuses_a_fractional_window(tiny):
    from meestral.evaluation.lm_model import MeestralLM

    with pytest.raises(MeestralError, match=r"max_length=1\.5 must be a whole number"):
        MeestralLM(backbone=tiny("mistral"), head="full", max_length=1.5)  # lm-eval parses 1.5 as a float


def test_lm_eval_model_refuses_a_continuation_longer_than_the_window(tiny):
    """A window shorter than a task's answer was a reshape traceback; an answer that just fits
    (the whole window, one context token left before it) is scored."""
    from meestral.evaluation.lm_model import MeestralLM

    lm = MeestralLM(backbone=tiny("mistral"), head="full", max_length=4)
    lm.progress = False
    with pytest.raises(MeestralError, match="continuation of 5 tokens does not fit the 4-token window"):
        lm._loglikelihood_tokens([(("a", "b"), [1, 5, 6], [7, 8, 9, 10, 11])])
    (logprob, _), = lm._loglikelihood_tokens([(("a", "b"), [1, 5, 6], [7, 8, 9, 10])])
    assert logprob < 0


@pytest.mark.slow
@pytest.mark.parametrize("window", ["1", "8"])
def test_eval_with_a_window_shorter_than_the_answers_is_one_line(window, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--backbone", "random:mistral", "--tasks", "arc_easy", "--limit", "2", "--max-length", window])
    out, err = capsys.readouterr()
    err = err.splitlines()[-1] + "\n"  # lm-eval's own progress bars come first
    assert_one_line_error(rc, "", err, [f"{window}-token window", "raise --max-length"])
    assert "Traceback" not in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_threshold_model_arg_example_is_a_threshold(tiny):
    from meestral.decoding.config import ExitConfig

    with pytest.raises(MeestralError, match=r"threshold='abc' .*e\.g\. threshold=0\.9"):
        ExitConfig.from_options(tiny("mistral"), head="softmax", threshold="abc")


# ---- environment and files ------------------------------------------------------------------------------
def test_cache_variable_pointing_at_a_file_is_named(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "cache"
    afile.write_text("not a folder")
    monkeypatch.setenv("MEESTRAL_CACHE", str(afile))
    rc = main(["generate", "hi", "--max-new-tokens", "1"])  # smollm2: its weights are unpacked in the cache
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, ["MEESTRAL_CACHE", str(afile), "is a file", "writable folder"])
    assert afile.read_text() == "not a folder"


def test_runs_folder_is_ignored_by_git():
    p = subprocess.run(["git", "check-ignore", "-q", "runs/smol/heads.json"], cwd=ROOT)
    assert p.returncode == 0


# ---- --help ------------------------------------------------------------------------------------------------
def _parsers():
    stack = [make_parser()]
    while stack:
        p = stack.pop()
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack += list(a.choices.values())


def test_every_option_has_help_and_shows_its_default():
    """--help listed options without a word on them and showed no defaults."""
    missing, no_default = [], []
    for p in _parsers():
        fmt = p._get_formatter()
        for a in p._actions:
            if isinstance(a, (argparse._SubParsersAction, argparse._HelpAction, argparse._VersionAction)):
                continue
            if not a.help:
                missing.append(f"{p.prog} {'/'.join(a.option_strings) or a.dest}")
            if a.option_strings and a.default is not None and a.default is not False and a.default not in ({}, []):
                shown = fmt._expand_help(a) if a.help else ""
                if "default" not in shown:
                    no_default.append(f"{p.prog} {a.option_strings[0]}")
    assert missing == [] and no_default == []


def test_help_names_the_default_once_and_head_full(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS tokens to generate at most (default: 48)" in out
    assert "--temperature TEMPERATURE sampling temperature; 0: greedy (default: 0.0)" in out
    assert "full (no exit heads: the full model)" in out
    assert out.count("(default: every quarter)") == 1 and "every quarter) (default" not in out
