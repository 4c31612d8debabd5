"""Every bad input of issue 12, driven through the CLI: exit status 2, no traceback, one line on
stderr naming the problem and the fix, and nothing written (neither in the working folder nor
beside the inputs). Plus the context-length rule and the rule table's coverage."""

import json
import os
import subprocess
import sys

import pytest

from meestral.cli.main import main, make_parser
from meestral.decoding.heads import ExitHeads
from meestral.validation import RULES, Items, Number
from test_cli import assert_one_line_error, tree

M = ["--backbone", "random:mistral"]
G = ["generate", "hi", *M, "--max-new-tokens", "2"]
TRAIN = ["train", *M, "--data", "embedded", "--steps", "1", "--no-progress"]
EVAL = ["eval", *M, "--tasks", "arc_easy", "--exits", "1,3"]
LM_EVAL = ["lm-eval", "--model", "meestral", "--model_args", "backbone=random:mistral", "--tasks", "meestral_arc_easy"]
CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Throwaway inputs: broken model folders, a binary prompt, heads, results folders."""
    from meestral.backbones.loading import random_backbone
    from meestral.backbones.tokenizer import bundled_mistral_v3_path

    root = tmp_path_factory.mktemp("fx")
    bb = random_backbone("mistral")
    config = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259}
    for name in ("noweights", "notokenizer", "shard_missing", "spm"):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "noweights" / "tokenizer.json").write_text("{}")
    bb.model.save_pretrained(root / "notokenizer")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (root / "shard_missing" / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "shard_missing" / "model-00001-of-00002.safetensors").write_bytes(b"")
    (root / "shard_missing" / "tokenizer.json").write_text("{}")
    bb.model.save_pretrained(root / "spm")  # a sentencepiece tokenizer.model alone (no tokenizer.json)
    spm = bundled_mistral_v3_path()
    if spm:
        (root / "spm" / "tokenizer.model").write_bytes(spm.read_bytes())
        (root / "spm" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    (root / "truncated").mkdir()  # a loadable tokenizer, half of the weights
    bb.model.save_pretrained(root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=word_level).save_pretrained(root / "truncated")
    (root / "binary.txt").write_bytes(bytes(range(256)))
    (root / "afile").write_text("a file, not a folder")
    ExitHeads("classifier", [1, 3], bb).save(root / "heads")
    ExitHeads("classifier", [1, 3], bb).save(root / "heads_flipped")
    weights = root / "heads_flipped" / "heads.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 3] ^= 0x40  # a byte of the tensor data
    weights.write_bytes(bytes(data))
    from test_report import write_results

    for name, oracle, cal in (("bad_oracle", [1, 2], None), ("bad_oracle_source", {"sources": {"embedded": 5}}, None),
                              ("bad_calibration", None, {"threshold": "x", "grid": 5})):
        d = write_results(root / name, optional=False)
        if oracle is not None:
            (d / "oracle.json").write_text(json.dumps(oracle))
        if cal is not None:
            (d / "calibration.json").write_text(json.dumps(cal))
    write_results(root / "good", optional=False)
    for name, change in (("heads_format2", {"format": 2}), ("heads_badkind", {"kind": "bogus"}),
                         ("heads_badpoints", {"exit_points": [1, 9]})):  # heads.json edited by hand
        ExitHeads("classifier", [1, 3], bb).save(root / name)
        meta = json.loads((root / name / "heads.json").read_text())
        (root / name / "heads.json").write_text(json.dumps({**meta, **change}))
    (root / "badconfig").mkdir()  # a local folder whose config.json is not a model config
    (root / "badconfig" / "config.json").write_text("{not json")
    return root


UNWRITABLE = "afile/sub/out"  # under a file: no one, root included, can create it

# name: (argv with {fx} for the fixtures folder, words the one line must hold)
CASES = {
    # -- tracebacks before
    "folder_without_weights_generate": (["generate", "hi", "--backbone", "{fx}/noweights"],
                                        ["noweights", "no weights", "model.safetensors", "copy"]),
    "folder_without_weights_info": (["info", "--backbone", "{fx}/noweights"], ["noweights", "no weights"]),
    "folder_without_tokenizer": (["info", "--backbone", "{fx}/notokenizer"], ["no tokenizer files", "tokenizer.json"]),
    "folder_weight_shard_missing": (["info", "--backbone", "{fx}/shard_missing"],
                                    ["model-00002-of-00002.safetensors", "index"]),
    "folder_weights_truncated": (["info", "--backbone", "{fx}/truncated"], ["cannot load the weights", "copy the weight"]),
    "prompt_file_binary": (["generate", "--file", "{fx}/binary.txt", *M], ["binary.txt", "not UTF-8", "0x80"]),
    "device_cuda_generate": (G + ["--device", "cuda"], ["'cuda'", "not available", "--device cpu"]),
    "device_cuda_train": (TRAIN + ["--device", "cuda"], ["'cuda'", "--device cpu"]),
    "device_bogus": (G + ["--device", "bogus"], ["'bogus'", "unknown device", "cpu, cuda"]),
    "device_cuda_index": (G + ["--device", "cuda:7"], ["'cuda:7'"]),
    "train_mlp_hidden_negative": (TRAIN + ["--mlp-hidden", "-1"], ["--mlp-hidden", "-1", ">= 0"]),
    "eval_limit_zero": (EVAL + ["--limit", "0"], ["--limit", "0", ">= 1"]),
    "eval_limit_negative": (EVAL + ["--limit", "-1"], ["--limit", "-1", ">= 1"]),
    "oracle_limit_zero": (["oracle", *M, "--tasks", "arc_easy", "--limit", "0"], ["--limit", "0"]),
    "lm_eval_limit_zero": (LM_EVAL + CPU + ["--limit", "0"], ["--limit", "'0'", "count >= 1"]),
    "lm_eval_limit_negative": (LM_EVAL + CPU + ["--limit=-1"], ["--limit", "'-1'"]),
    # -- accepted although wrong before
    "prompt_past_context": (["generate", "x" * 5000, *M], ["5,001 tokens", "context of 2,048", "shorten the prompt"]),
    "prompt_past_context_catchup": (["generate", "x" * 5000, *M, "--policy", "catchup"], ["context of 2,048"]),
    "max_new_tokens_past_context": (G[:-1] + ["3000"], ["3,000 new tokens", "context of 2,048", "--max-new-tokens"]),
    "max_new_tokens_unbounded": (G[:-1] + ["100000"], ["100,000 new tokens", "context of 2,048"]),
    "temperature_inf": (G + ["--temperature", "inf"], ["--temperature", "inf", "finite"]),
    "temperature_nan": (G + ["--temperature", "nan"], ["--temperature", "nan", "finite number >= 0"]),
    "train_lr_nan": (TRAIN + ["--lr", "nan"], ["--lr", "nan", "(0, 1]"]),
    "train_lr_huge": (TRAIN + ["--lr", "1e308"], ["--lr", "1e+308", "(0, 1]"]),
    "train_clip_nan": (TRAIN + ["--clip", "nan"], ["--clip", "nan"]),
    "train_clip_negative": (TRAIN + ["--clip", "-1"], ["--clip", "-1", "> 0"]),
    "train_warmup_negative": (TRAIN + ["--warmup", "-1"], ["--warmup", "-1", ">= 0"]),
    "train_weight_decay_negative": (TRAIN + ["--weight-decay", "-1"], ["--weight-decay", "-1"]),
    "train_head_weights_nan": (TRAIN + ["--head-weights", "nan,1"], ["--head-weights", "nan"]),
    "eval_tasks_empty": (["eval", *M, "--tasks", ""], ["--tasks", "empty", "arc_easy"]),
    "train_seq_len_past_context": (TRAIN + ["--seq-len", "4096"], ["--seq-len 4096", "context of 2,048"]),
    "oracle_seq_len_past_context": (["oracle", *M, "--seq-len", "5000", "--tokens", "5000"], ["--seq-len 5000", "context of 2,048"]),
    "eval_max_length_past_context": (EVAL + ["--max-length", "100000"], ["max_length 100000", "context of 2,048"]),
    "sweep_max_length_past_context": (["sweep", *M, "--tasks", "arc_easy", "--thresholds", "0.5", "--max-length",
                                       "4096"], ["max_length 4096", "context of 2,048"]),
    "lm_eval_device_default_without_cuda": (LM_EVAL, ["'cuda:0'", "--device cpu"]),  # lm-eval's default device
    "lm_eval_output_path_unwritable": (LM_EVAL + CPU + ["--output_path", "{fx}/" + UNWRITABLE], ["--output_path", "not writable"]),
    "heads_bytes_flipped": (G + ["--heads", "{fx}/heads_flipped"], ["heads.safetensors", "checksum", "re-train"]),
    "thresholds_repeated": (["sweep", *M, "--tasks", "arc_easy", "--thresholds", "0.5,0.5"],
                            ["--thresholds", "0.5", "twice"]),
    # -- more tracebacks before
    "oracle_seq_len_zero": (["oracle", *M, "--seq-len", "0"], ["--seq-len", ">= 1"]),
    "calibrate_seq_len_zero": (["calibrate", *M, "--seq-len", "0"], ["--seq-len", ">= 1"]),
    "calibrate_batch_size_zero": (["calibrate", *M, "--batch-size", "0"], ["--batch-size", ">= 1"]),
    "bench_repeats_zero": (["bench", *M, "--repeats", "0"], ["--repeats", ">= 1"]),
    "report_docs_png_unwritable": (["report", "--results", "{fx}/good", "--docs-png", "{fx}/" + UNWRITABLE + ".png"],
                                   ["--docs-png", "not writable"]),
    "demo_report_dir_unwritable": (["demo", "--report-dir", "{fx}/" + UNWRITABLE], ["--report-dir", "not writable"]),
    "report_oracle_not_an_object": (["report", "--results", "{fx}/bad_oracle"], ["oracle.json", "rerun"]),
    "report_oracle_source_not_an_object": (["report", "--results", "{fx}/bad_oracle_source"], ["oracle.json"]),
    "report_calibration_wrong_shape": (["report", "--results", "{fx}/bad_calibration"], ["calibration.json", "rerun"]),
    # -- failed commands that left output or checked too late
    "oracle_heads_fail": (["oracle", *M, "--heads", "{fx}/afile"], ["heads.json"]),
    "eval_out_unwritable": (EVAL + ["--out", "{fx}/" + UNWRITABLE + ".json"], ["--out", "not writable"]),
    "sweep_out_unwritable": (["sweep", *M, "--tasks", "arc_easy", "--thresholds", "0.5", "--out",
                              "{fx}/" + UNWRITABLE + ".jsonl"], ["--out", "not writable"]),
    "demo_max_new_tokens_zero": (["demo", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    # -- options silently ignored before
    "exits_empty": (G + ["--exits", ""], ["--exits", "empty"]),
    "heads_with_exits": (G + ["--heads", "{fx}/heads", "--exits", "2"], ["--exits", "no effect with --heads"]),
    "heads_with_head": (G + ["--heads", "{fx}/heads", "--head", "margin"], ["--head", "no effect with --heads"]),
    "policies_empty": (["sweep", *M, "--tasks", "arc_easy", "--thresholds", "0.5", "--policies", ""],
                       ["--policies", "empty"]),
    "train_tokens_zero": (TRAIN[:-3] + ["--tokens", "0", "--no-progress"], ["--tokens", ">= 1"]),
    "train_steps_and_tokens": (TRAIN + ["--tokens", "100"], ["--steps and --tokens"]),
    "heads_empty_string": (G + ["--heads", ""], ["--heads", "empty"]),
    "stop_empty_string": (G + ["--stop", ""], ["--stop", "empty"]),
    # -- misleading messages before
    "train_val_rows_negative": (TRAIN + ["--val-rows", "-1"], ["--val-rows", "-1", ">= 0"]),
    "exits_negative_in_a_list": (G + ["--exits", "-1,3"], ["[-1]", "out of range"]),
    "report_results_is_a_file": (["report", "--results", "{fx}/afile"], ["is a file", "sweep.jsonl"]),
    # -- issue 21: CLI and evaluation faults (tests/test_faults_cli.py has the rest)
    "eval_limit_fraction": (EVAL + ["--limit", "1.5"], ["--limit", "'1.5'"]),
    "calibrate_threshold_not_taken": (["calibrate", *M, "--threshold", "0.5"],
                                      ["meestral calibrate does not take --threshold 0.5", "drop it"]),
    "oracle_policy_not_taken": (["oracle", *M, "--policy", "catchup"], ["meestral oracle does not take --policy"]),
    "oracle_lens_text_too_long": (["oracle", *M, "--lens-text", "x" * 20000],
                                  ["--lens-text", "20,001 tokens", "at most 128", "shorter"]),
    "oracle_tokens_below_one_row": (["oracle", *M, "--tokens", "8", "--seq-len", "32"],
                                    ["--tokens 8", "--seq-len 32", "raise --tokens"]),
    "calibrate_tokens_below_one_row": (["calibrate", *M, "--tokens", "8", "--seq-len", "32"], ["--tokens 8"]),
    "bench_exits_duplicated": (["bench", *M, "--exits", "2,2"], ["[2]", "twice"]),
    "bench_profile_is_a_folder": (["bench", *M, "--profile", "{fx}"], ["--profile", "is a folder", "file path"]),
    "demo_backbone_twice": (["demo", "--backbone", "random:mistral,random:mistral"], ["--backbone", "twice"]),
    "demo_report_dir_with_no_report": (["demo", "--no-report", "--report-dir", "elsewhere"],
                                       ["--report-dir", "--no-report", "drop one"]),
    "heads_json_format_newer": (G + ["--heads", "{fx}/heads_format2"], ["heads.json", "format 2", "upgrade"]),
    "heads_json_kind_unknown": (G + ["--heads", "{fx}/heads_badkind"], ["heads_badkind/heads.json", "'bogus'"]),
    "heads_json_exit_point_out_of_range": (G + ["--heads", "{fx}/heads_badpoints"], ["heads_badpoints/heads.json", "[9]"]),
    "heads_json_of_another_backbone": (["generate", "hi", "--backbone", "random:mistral:seed1", "--heads", "{fx}/heads"],
                                       ["{fx}/heads/heads.json", "belong to backbone", "train new heads"]),
    "head_unknown_kind": (G + ["--head", "bogus"], ["--head 'bogus'", "full", "--heads DIR"]),
    "chat_without_a_template": (["generate", "hi", "--backbone", "random:mamba2", "--chat"],
                                ["--chat", "no chat template", "drop --chat"]),
    "info_folder_config_unreadable": (["info", "--backbone", "{fx}/badconfig"],
                                      ["badconfig/config.json", "copy the model's config.json"]),
    "adapt_corpus_empty": (["adapt", "train", "--corpus", ""], ["--corpus is empty: give a value, or leave"]),
    "distill_corpus_empty": (["distill", "train", "--corpus", ""], ["--corpus none for none"]),
    "sweep_threshold_ignored": (["sweep", *M, "--tasks", "arc_easy", "--thresholds", "0.5", "--threshold", "0.7"],
                                ["--threshold has no effect on a sweep", "--thresholds"]),
    "sweep_verify_ignored": (["sweep", *M, "--tasks", "arc_easy", "--thresholds", "0.5", "--verify"],
                             ["--verify has no effect on a sweep", "--policies"]),
    "oracle_exits_auto": (["oracle", *M, "--exits", "auto"], ["argument --exits", "'auto'", "meestral oracle --help"]),
    "thresholds_not_numbers": (["sweep", *M, "--tasks", "arc_easy", "--thresholds", "a,b"], ["argument --thresholds"]),
    "info_missing_folder_with_a_slash": (["info", "--backbone", "mymodel/"], ["backbone path mymodel/ does not exist"]),
    "no_model_given_to_lm_eval": (["lm-eval", "--tasks", "meestral_arc_easy"], ["needs --model", "--model meestral"]),
    "lm_eval_limit_fraction": (LM_EVAL + CPU + ["--limit", "1.5"], ["--limit", "'1.5'", "count >= 1"]),
}


# lm-eval's cases load its task registry (seconds each): the full tier runs them.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("lm_eval") else n for n in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, fx, tmp_path, monkeypatch, capsys):
    argv, words = CASES[name]
    argv = [a.replace("{fx}", str(fx)) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = tree(fx)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, [w.replace("{fx}", str(fx)) for w in words])
    assert os.listdir(tmp_path) == []
    assert tree(fx) == before


@pytest.mark.slow
def test_lm_eval_model_refuses_a_window_past_the_context(tmp_path, monkeypatch, capsys):
    """Inside lm-eval's own CLI the same rule holds; lm-eval's INFO lines come first, ours ends it."""
    monkeypatch.chdir(tmp_path)
    rc = main(["lm-eval", "--model", "meestral", "--model_args", "backbone=random:mistral,max_length=100000",
               "--tasks", "meestral_arc_easy", *CPU])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1].startswith("meestral: error: max_length 100000 needs 100,000 positions, but "
                                           "random:mistral:seed0 has a context of 2,048")
    assert os.listdir(tmp_path) == []


def test_tokenizer_needing_an_absent_package(fx, tmp_path, monkeypatch, capsys):
    if not (fx / "spm" / "tokenizer.model").exists():
        pytest.skip("mistral_common (which ships a sentencepiece model) is not installed")
    for mod in ("sentencepiece", "google.protobuf", "google", "tiktoken"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails, find_spec says absent
    monkeypatch.chdir(tmp_path)
    rc = main(["generate", "hi", "--backbone", str(fx / "spm")])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, ["tokenizer", "pip install", "sentencepiece", "tokenizer.json"])
    assert os.listdir(tmp_path) == []


def test_stdin_closed_in_process(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when the shell closed it (`<&-`)
    rc = main(["generate", *M])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, ["no prompt", "--file"])


@pytest.mark.slow
def test_stdin_closed_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, "-m", "meestral.cli.main", "generate", *M], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, stdin=None, preexec_fn=lambda: os.close(0))
    assert_one_line_error(p.returncode, p.stdout, p.stderr, ["no prompt"])


def test_version(capsys):
    from meestral import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"meestral {__version__}\n"


# ---- the context-length rule -----------------------------------------------------------------------
def test_context_rule_at_the_limit_is_accepted(capsys):
    """Exactly the context (prompt + new tokens = 2,048) runs; one more is refused (CASES)."""
    prompt = "x" * (2048 - 2 - 1)  # the byte tokenizer: a BOS + one token a byte
    assert main(["generate", prompt, *M, "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "length"
    assert main(["generate", prompt + "x", *M, "--max-new-tokens", "2", "--json"]) == 2
    assert "2,049 positions" in capsys.readouterr().err


@pytest.mark.slow
def test_context_rule_has_no_limit_on_state_space_models(capsys):
    """Mamba-2 has no positional limit: a 5,000-token prompt is valid input (the rule documents it)."""
    assert main(["generate", "x" * 5000, "--backbone", "random:mamba2", "--max-new-tokens", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 2


def test_lm_eval_window_refuses_a_generation_longer_than_itself(tiny):
    from meestral.errors import MeestralError
    from meestral.evaluation.lm_model import MeestralLM

    class Request:
        args = ("a prompt", {"until": ["\n"], "max_gen_toks": 64})

    lm = MeestralLM(backbone=tiny("mistral"), head="full", max_length=64)
    with pytest.raises(MeestralError, match="64 new tokens.*64-token window"):
        lm.generate_until([Request()])


@pytest.mark.slow
def test_context_rule_on_smollm2(capsys):
    """The embedded backbone (8,192 positions) refuses a 9,001-token prompt before decoding."""
    rc = main(["generate", "hello " * 9001, "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, ["context of 8,192", "shorten the prompt"])


# ---- the rule table ---------------------------------------------------------------------------------
def _actions():
    stack = list(make_parser()._subparsers._group_actions[0].choices.values())
    while stack:  # nested commands too (`distill sample|train|export`)
        sub = stack.pop()
        for action in sub._actions:
            if action.choices and isinstance(action.choices, dict):
                stack += list(action.choices.values())
            yield sub.prog, action


def test_every_numeric_option_has_a_rule():
    """A new int/float/list option cannot skip validation: the table must name it."""
    from meestral.cli.common import floats as _floats, ints as _ints

    missing = sorted({f"{prog} --{a.dest}" for prog, a in _actions()
                      if a.type in (int, float, _ints, _floats) and a.dest not in RULES})
    assert missing == []


@pytest.mark.parametrize("rule, good, bad", [
    (Number(int, 1), [1, 10**9], [0, -1, 1.5, float("nan"), True]),
    (Number(float, 0, 1, low_open=True), [1.0, 1e-9], [0.0, 1.0001, float("inf"), float("nan")]),
    (Items(Number(int), unique=True), [[1], [3, 1]], [[], [1, 1], [1.5]]),
    (Items(unique=True), ["a,b", "a"], ["", ",", "a,a"]),
])
def test_rules_accept_and_refuse(rule, good, bad):
    from meestral.errors import MeestralError

    for v in good:
        rule.check(v, "--x")
    for v in bad:
        with pytest.raises(MeestralError, match="--x"):
            rule.check(v, "--x")
