"""The evaluation commands as a user drives them: lm-eval's CLI with our model, sweeps that
survive SIGKILL, and one-line errors for bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from meestral.cli.main import main

TINY = ["--backbone", "random:mistral", "--exits", "1,3", "--head", "softmax"]


def _meestral(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "meestral.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def _table_values(text, task):
    """{metric: value} from lm-eval's printed table rows of one task."""
    out, current = {}, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7:
            continue
        if cells[0]:
            current = cells[0]
        if current == task and cells[4] in ("acc", "acc_norm"):
            out[cells[4]] = float(cells[6])
    return out


@pytest.mark.slow
def test_lm_eval_cli_never_exit_equals_hf_model(tmp_path):
    """`meestral lm-eval` runs lm-eval's own CLI; with thresholds that never exit, its scores equal
    lm-eval's `hf` model on the same backbone and task (per request, so per metric)."""
    from lm_eval import simple_evaluate

    from meestral.backbones.assets import smollm2_dir
    from meestral.evaluation.tasks import task_manager

    limit = 12
    r = _meestral("lm-eval", "--model", "meestral", "--model_args",
                  "backbone=smollm2,head=softmax,exits=7:15:22,threshold=1.0,policy=catchup,batch_size=4",
                  "--tasks", "meestral_arc_easy", "--limit", str(limit), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    ours = _table_values(r.stdout, "meestral_arc_easy")
    assert set(ours) == {"acc", "acc_norm"}, r.stdout
    ref = simple_evaluate(model="hf", model_args=f"pretrained={smollm2_dir()},dtype=float32", device="cpu",
                          tasks=["meestral_arc_easy"], limit=limit, batch_size=4,
                          task_manager=task_manager(["meestral_arc_easy"]))
    theirs = ref["results"]["meestral_arc_easy"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-4)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-4)

    # Request by request, not only the accuracy: the same log-likelihoods and greedy flags.
    from lm_eval.models.huggingface import HFLM

    from meestral.evaluation.lm_model import MeestralLM
    from meestral.evaluation.runner import load_tasks

    task = load_tasks(["arc_easy"])[1]["tasks"]["meestral_arc_easy"]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    hf = HFLM(pretrained=str(smollm2_dir()), device="cpu", batch_size=4, dtype="float32")
    mine = MeestralLM(backbone="smollm2", head="softmax", exits="7:15:22", threshold=1.0, policy="catchup")
    a, b = hf.loglikelihood(task.instances), mine.loglikelihood(task.instances)
    assert len(a) == len(b) == 4 * limit
    assert [g for _, g in a] == [g for _, g in b]
    assert [x for x, _ in b] == pytest.approx([x for x, _ in a], abs=1e-4)


@pytest.mark.slow  # spawns sweeps and kills one
def test_sweep_killed_and_restarted_runs_only_missing_points(tmp_path):
    out = tmp_path / "sweep.jsonl"
    # Random softmax confidences sit near 1/259: thresholds around their median make some points exit.
    args = ["sweep", *TINY, "--tasks", "arc_easy", "--limit", "25", "--thresholds", "0.005,0.006,0.007,0.5",
            "--policies", "copy,propagate,catchup", "--static-layers", "2", "--layer-drop", "1,2", "--out", str(out)]
    total = 1 + 3 * 4 + 1 + 2
    proc = subprocess.Popen([sys.executable, "-m", "meestral.cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= 3:  # header + 2 finished points
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len({json.loads(l)["key"] for l in out.read_text().splitlines()[1:] if l.endswith("}")})
    assert 2 <= done < total, "the first run must be killed mid-sweep"
    r = _meestral(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"sweep: (\d+) points, (\d+) already in .*, running (\d+)", r.stderr)
    assert m and int(m.group(1)) == total and int(m.group(3)) == total - int(m.group(2))
    assert int(m.group(2)) >= done
    rows = [json.loads(l) for l in out.read_text().splitlines()[1:]]
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == total
    r = _meestral(*args)  # complete: nothing left to run
    assert "running 0" in r.stderr
    full = next(row for row in rows if row["config"]["baseline"] == "full")
    assert full["agreement"] == 1.0 and full["weight_bytes_ratio"] == pytest.approx(1.0)
    for row in rows:
        assert row["tokens"] > 0
        cfg = row["config"]
        if cfg["baseline"] == "layer_drop":
            assert row["mean_layers_run"] == 6 - cfg["layer"]
        if cfg["baseline"] == "static":  # always leaves at its layer
            assert row["exit_rate"] == 1.0 and row["mean_layers_run"] == cfg["layer"] + 1
        if cfg["baseline"] is None and row["exit_rate"] == 0:  # never left: the full model's scores
            assert row["value"] == full["value"] and row["agreement"] == 1.0
    assert any(row["config"]["baseline"] is None and row["exit_rate"] > 0 for row in rows)  # some points exit


def test_sweep_refuses_a_results_file_of_another_configuration(tmp_path, capsys):
    out = tmp_path / "sweep.jsonl"
    assert main(["sweep", *TINY, "--tasks", "arc_easy", "--limit", "2", "--thresholds", "0.5",
                 "--policies", "catchup", "--out", str(out)]) == 0
    before = out.read_text()
    capsys.readouterr()
    assert main(["sweep", "--backbone", "random:mamba2", "--exits", "1,3", "--head", "softmax", "--tasks", "arc_easy",
                 "--limit", "2", "--thresholds", "0.5", "--policies", "catchup", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration" in err[0]
    assert out.read_text() == before


@pytest.mark.parametrize("argv, needle", [
    (["eval", *TINY, "--tasks", "no_such_task"], "unknown task"),
    (["sweep", *TINY, "--tasks", "arc_easy", "--thresholds", ""], "--thresholds is empty"),
    (["sweep", *TINY, "--tasks", "arc_easy", "--thresholds", "0.5,1.5"], "--thresholds holds 1.5"),
    (["lm-eval", "--model", "meestral", "--model_args", "backbone=random:mistral,bogus=1", "--tasks",
      "meestral_arc_easy"], "unknown --model_args key 'bogus'"),
    (["lm-eval", "--model", "meestral", "--model_args", "backbone", "--tasks", "meestral_arc_easy"],
     "malformed --model_args"),
    (["lm-eval", "--model", "meestral", "--model_args", "backbone=random:mistral", "--tasks", "nope_task"],
     "unknown task(s) nope_task"),
])
def test_bad_input_is_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored after: later tests run from the repository root
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meestral: error:") and needle in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_model_args_lists_and_errors():
    from meestral.errors import MeestralError
    from meestral.evaluation.lm_model import MeestralLM

    lm = MeestralLM.create_from_arg_string("backbone=random:mistral,head=margin,exits=1:3,threshold=0.4:0.6,policy=catchup,verify=true")
    assert lm.heads.exit_points == [1, 3] and list(lm.dec.config.thresholds) == [0.4, 0.6] and lm.dec.config.verify
    with pytest.raises(MeestralError, match="threshold"):
        MeestralLM.create_from_arg_string("backbone=random:mistral,threshold=2")
    with pytest.raises(MeestralError, match="not a ':'-separated list"):
        MeestralLM.create_from_arg_string("backbone=random:mistral,exits=a:b")
    with pytest.raises(MeestralError, match="out of range"):
        MeestralLM.create_from_arg_string("backbone=random:mistral,exits=1:9")


def test_oracle_calibrate_report_end_to_end(tmp_path):
    res = tmp_path / "results"
    assert main(["sweep", *TINY, "--tasks", "arc_easy", "--limit", "4", "--thresholds", "0.2,0.5",
                 "--policies", "copy,catchup", "--static-layers", "2", "--layer-drop", "1",
                 "--out", str(res / "sweep.jsonl")]) == 0
    assert main(["oracle", *TINY, "--tokens", "512", "--seq-len", "64", "--out", str(res / "oracle.json")]) == 0
    oracle = json.loads((res / "oracle.json").read_text())
    src = oracle["sources"]["embedded"]
    assert src["tokens"] == 512 and len(src["agreement"]) == len(src["layers"])
    lens = json.loads((res / "lens.json").read_text())
    assert len(lens["top_tokens"]) == 6 and set(lens["confidence"]) == {"1", "3"}
    assert main(["calibrate", *TINY, "--tokens", "1024", "--seq-len", "64", "--epsilon", "0.3",
                 "--out", str(res / "calibration.json")]) == 0
    cal = json.loads((res / "calibration.json").read_text())
    # Learn-then-Test's choice: the last threshold of the walk whose p-value was rejected (1.0,
    # never exit, when none was), and every rejected one passed the test.
    rejected = [g for g in cal["grid"] if g["rejected"]]
    assert cal["threshold"] == (rejected[-1]["threshold"] if rejected else 1.0)
    assert all(g["p_value"] <= cal["delta"] for g in rejected) and cal["heldout_n"] > 0
    if cal["heldout_exit_rate"] == 0:
        assert cal["heldout_agreement"] == 1.0
    png = tmp_path / "docs" / "tradeoff.png"
    assert main(["report", "--results", str(res), "--docs-png", str(png)]) == 0
    html = (res / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and (res / "report.md").exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_rolling_is_the_full_models(lm, bb, text="To be, or not to be"):
    """lm's loglikelihood_rolling of `text` = the full model's log-likelihood of every token after
    the prefix token."""
    import torch
    from lm_eval.api.instance import Instance

    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    ref = bb.full_logits(torch.tensor([ids])).float().log_softmax(-1)[0]
    want = sum(float(ref[t, ids[t + 1]]) for t in range(len(ids) - 1))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert got[0] == pytest.approx(want, abs=1e-3)


def test_rolling_and_generation_requests_on_the_full_model(tiny):
    """loglikelihood_rolling = the full model's log-likelihood of every token after the prefix
    token; generate_until = greedy decoding cut at the first stop sequence."""
    from lm_eval.api.instance import Instance

    from meestral.evaluation.lm_model import MeestralLM

    bb = tiny("mistral")
    lm = MeestralLM(backbone=bb, head="full")
    assert_rolling_is_the_full_models(lm, bb)

    full = lm.dec.generate([lm.tok_encode("Once")], __import__("meestral.decoding.decoder", fromlist=["x"]).SamplingOptions(
        max_new_tokens=12))[0].text
    stop = full[3:5]
    out = lm.generate_until([Instance("generate_until", {}, ("Once", {"until": [stop], "max_gen_toks": 12}), 0)],
                            disable_tqdm=True)
    assert out[0] == full.split(stop)[0]
    assert lm.records[-1]["kind"] == "generate_until" and lm.accounting()["requests"] == 2


def test_eval_command_writes_results_and_accounting(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", *TINY, "--tasks", "arc_easy", "--limit", "3", "--threshold", "0.2", "--policy", "catchup",
                 "--verify", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "meestral_arc_easy" in table and "acc_norm" in table
    res = json.loads(out.read_text())
    assert res["config"]["verify"] and res["config"]["exits"] == [1, 3]
    assert "meestral_arc_easy" in res["results"] and res["accounting"]["requests"] > 0
    assert res["accounting"]["agreement"] == 1.0  # verify: the emitted distribution is the full model's


def test_speculate_through_lm_eval_is_the_full_model(tiny):
    """policy=speculate (with draft_tokens and the default threshold 0: always draft) scores and
    generates as the full model does: lossless, whatever its drafts."""
    from lm_eval.api.instance import Instance

    from meestral.evaluation.lm_model import MeestralLM

    bb = tiny("mistral")
    lm = MeestralLM(backbone=bb, exits="2", policy="speculate", draft_tokens="3")
    cfg = lm.dec.config
    assert (cfg.policy, cfg.draft_tokens, cfg.adaptive, tuple(cfg.thresholds)) == ("speculate", 3, False, (0.0,))
    assert_rolling_is_the_full_models(lm, bb)
    full = MeestralLM(backbone=bb, head="full")
    req = [Instance("generate_until", {}, ("Once", {"until": ["\n\n\n"], "max_gen_toks": 12}), 0)]
    assert lm.generate_until(req, disable_tqdm=True) == full.generate_until(req, disable_tqdm=True)


def test_lm_eval_task_names_of_the_suite_skip_lm_evals_own_index(monkeypatch):
    """Naming only suite tasks indexes the include path alone (lm-eval's ~15,000 configs cost
    seconds, and lm-eval indexes them again itself); an unknown name still looks everywhere."""
    import lm_eval.tasks

    from meestral.cli.evaluate import _check_task_names
    from meestral.errors import MeestralError
    from meestral.evaluation.tasks import ensure_tasks

    made, real = [], lm_eval.tasks.TaskManager

    def counting(*a, **k):
        made.append(k.get("include_defaults", True))
        return real(*a, **k)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", counting)
    _check_task_names("meestral_arc_easy,meestral_piqa", str(ensure_tasks()))
    assert made == [False]
    with pytest.raises(MeestralError, match="unknown task"):
        _check_task_names("meestral_arc_easy,nope_task", str(ensure_tasks()))
    assert made == [False, False, True]


@pytest.mark.parametrize("given, expect", [([], "8"), (["--batch_size", "2"], "2"), (["-b", "4"], "4")])
def test_lm_eval_batch_size_defaults_to_the_models(given, expect, monkeypatch):
    """lm-eval's CLI passes its own default batch size 1, which would override MeestralLM's 8 and
    double the CPU time of scoring; a size the user gives (option or model_args) is kept."""
    import meestral.cli.evaluate as ev

    seen = []
    monkeypatch.setattr(ev, "_lm_eval_cli", lambda argv: seen.append(list(argv)) or 0)
    base = ["lm-eval", "--model", "meestral", "--tasks", "meestral_arc_easy", "--device", "cpu"]
    assert main([*base, "--model_args", "backbone=random:mistral", *given]) == 0
    assert ev._option(seen[-1], "--batch_size", "-b") == expect
    assert main([*base, "--model_args", "backbone=random:mistral,batch_size=3"]) == 0
    assert ev._option(seen[-1], "--batch_size", "-b") is None  # model_args win over lm-eval's options
