"""The `meestral` command line, driven as a user would: a few end-to-end runs of the real entry
point (`python -m meestral.cli.main`, ~3 s of imports each) and the rest through `main([...])`."""

import json
import os
import subprocess
import sys

import pytest

import meestral.tools.bench  # noqa: F401  (imported up front: see test_bench_in_process_honours_redirected_stdout)
from meestral.cli.main import main
from meestral.decoding.heads import ExitHeads

L = 6  # layers of every tiny random shape used here
PROMPT = "Hello world"


# ---- helpers ----------------------------------------------------------------------------------
def run_sub(args, cwd, input=None):
    """The real entry point in a fresh interpreter; returns (returncode, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    p = subprocess.run([sys.executable, "-m", "meestral.cli.main", *args], cwd=cwd, input=input, capture_output=True,
                       text=True, timeout=120, env=env, stdin=None if input is not None else subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def run_main(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def tree(root):
    """Every path under root with its size and mtime: to show that nothing was written."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def gen_args(backbone, *extra, prompt=PROMPT, n=6):
    return ["generate", *([prompt] if prompt is not None else []), "--backbone", backbone, "--json",
            "--max-new-tokens", str(n), *extra]


def one_json_object(out):
    assert out.endswith("\n") and out.count("\n") == 1, f"expected one JSON line, got {out!r}"
    return json.loads(out)


def assert_consistent(d, num_layers=L):
    assert d["backbone"]["num_layers"] == num_layers
    assert len(d["tokens"]) == len(d["token_ids"]) > 0
    assert d["tokens"][0]["prefill"] is True
    assert not any(t["prefill"] for t in d["tokens"][1:])
    assert d["summary"]["tokens"] == len(d["tokens"]) - 1


# ---- generate --json --------------------------------------------------------------------------
# (backbone, mode, through a subprocess?): two end-to-end runs, the other two in-process.
GEN_CASES = [
    ("random:mistral", "full", True),
    ("random:mamba2", "full", False),
    ("random:mistral", "static", False),
    ("random:mamba2", "static", True),
]
slow = pytest.mark.slow  # spawns the real entry point


@pytest.mark.parametrize("backbone,mode,sub", [pytest.param(*c, marks=[slow] if c[2] else []) for c in GEN_CASES],
                         ids=[f"{b}-{m}" for b, m, _ in GEN_CASES])
def test_generate_json(backbone, mode, sub, tmp_path, capsys, monkeypatch):
    extra = ["--threshold", "1"] if mode == "full" else ["--head", "static", "--exits", "1", "--threshold", "0"]
    args = gen_args(backbone, *extra)
    if sub:
        rc, out, err = run_sub(args, tmp_path)
    else:
        monkeypatch.chdir(tmp_path)
        rc, out, err = run_main(args, capsys)
    assert rc == 0, err
    d = one_json_object(out)
    assert_consistent(d)
    assert d["backbone"]["name"] == f"{backbone}:seed0"
    assert d["prompt"] == PROMPT
    assert len(d["token_ids"]) == 6 and d["finish_reason"] == "length"
    if mode == "full":
        assert [t["exit_layer"] for t in d["tokens"]] == [L - 1] * 6
        assert d["thresholds"] == [1.0] * len(d["heads"]["exit_points"])
        assert d["summary"]["exit_rate"] == 0
    else:
        assert d["heads"]["kind"] == "static" and d["heads"]["exit_points"] == [1]
        assert d["tokens"][0]["exit_layer"] == L - 1 and d["tokens"][0]["layers_run"] == L
        for t in d["tokens"][1:]:
            assert (t["exit_layer"], t["layers_run"]) == (1, 2), t
        assert d["summary"]["exit_rate"] == 1
        assert 0 < d["summary"]["weight_bytes_ratio"] < 1
    assert os.listdir(tmp_path) == []


def test_plain_output_is_text_with_summary_on_stderr(capsys):
    rc, out, err = run_main(["generate", PROMPT, "--backbone", "random:llama", "--max-new-tokens", "4",
                             "--head", "static", "--exits", "2", "--threshold", "0"], capsys)
    assert rc == 0
    assert "\x1b[" not in out  # not a terminal: no colours
    assert "exits at L2" in err and "3 decoded tokens" in err and "exit rate 100%" in err


def test_plain_output_prints_characters_spread_over_several_tokens_whole():
    """With the byte tokenizer every UTF-8 byte is a token: CJK takes 3, an emoji 4. The printed
    text (plain, and coloured once the colour codes are removed) equals the decoded text."""
    import re
    from types import SimpleNamespace

    from meestral.cli.generate import colour_tokens
    from meestral.backbones.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    text = "中文 ok 😀!"
    ids = tok.encode(text, add_bos=False) + [2]  # ... then EOS
    layers = [1 if i % 2 else 5 for i in range(len(ids))]  # some tokens exit at L1, the rest go deep
    gen = SimpleNamespace(token_ids=ids, exit_layers=layers)
    assert colour_tokens(tok, gen, 6, [1, 3], colour=False) == text
    coloured = colour_tokens(tok, gen, 6, [1, 3], colour=True)
    assert "\x1b[" in coloured and re.sub(r"\x1b\[\d+m", "", coloured) == text
    cut = SimpleNamespace(token_ids=ids[:2], exit_layers=layers[:2])  # two bytes of three: shown as is
    assert colour_tokens(tok, cut, 6, [1, 3], colour=False) == tok.decode(ids[:2])


@slow
def test_prompt_from_argument_file_and_stdin_agree(tmp_path, capsys):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    rc, out, _ = run_main(gen_args("random:mistral"), capsys)
    assert rc == 0
    from_arg = one_json_object(out)
    rc, out, _ = run_main(gen_args("random:mistral", "--file", str(path), prompt=None), capsys)
    assert rc == 0
    from_file = one_json_object(out)
    rc, out, err = run_sub(gen_args("random:mistral", prompt=None), tmp_path, input=PROMPT)
    assert rc == 0, err
    from_stdin = one_json_object(out)
    assert from_arg["prompt"] == from_file["prompt"] == from_stdin["prompt"] == PROMPT
    assert from_arg["token_ids"] == from_file["token_ids"] == from_stdin["token_ids"]
    assert len(from_arg["token_ids"]) == 6


def test_prompt_both_argument_and_file_is_refused(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("x")
    rc, out, err = run_main(gen_args("random:mistral", "--file", str(path)), capsys)
    assert rc == 2 and out == "" and err.startswith("meestral: error:") and "--file" in err


@pytest.mark.parametrize("backbone,prompt", [("random:mistral", PROMPT), ("random:mamba2", "abc")])
def test_stop_string_ends_generation(backbone, prompt, capsys):
    rc, out, _ = run_main(gen_args(backbone, "--threshold", "1", prompt=prompt, n=12), capsys)
    assert rc == 0
    free = one_json_object(out)
    text = free["text"]
    # A two-character stop string that really occurs after the first generated character.
    i = next(i for i in range(1, len(text) - 1) if text[i:i + 2].isprintable() and text[i:i + 2].isascii())
    stop = text[i:i + 2]
    rc, out, _ = run_main(gen_args(backbone, "--threshold", "1", "--stop", stop, prompt=prompt, n=12), capsys)
    assert rc == 0
    d = one_json_object(out)
    assert d["finish_reason"] == "stop"
    assert stop not in d["text"]
    assert d["text"] == text[: text.find(stop)]
    assert len(d["token_ids"]) < len(free["token_ids"])
    assert d["token_ids"] == free["token_ids"][: len(d["token_ids"])]
    assert_consistent(d)


# ---- user errors ------------------------------------------------------------------------------
G = ["generate", "hi", "--max-new-tokens", "3"]
MISTRAL = ["--backbone", "random:mistral"]

# name: (argv, words the one-line message must contain)
ERRORS = {
    "backbone_path_missing": (G + ["--backbone", "/nonexistent/dir"], ["/nonexistent/dir", "does not exist"]),
    "backbone_unknown_name": (G + ["--backbone", "nosuchmodel"], ["nosuchmodel", "unknown backbone"]),
    "backbone_unknown_shape": (G + ["--backbone", "random:nosuchshape"], ["nosuchshape", "random shape"]),
    "exit_out_of_range": (G + MISTRAL + ["--exits", "99"], ["99", "out of range"]),
    "exits_duplicated": (G + MISTRAL + ["--exits", "1,1"], ["[1]", "twice"]),
    "exits_not_numbers": (G + MISTRAL + ["--exits", "a,b"], ["--exits", "'a,b'", "whole numbers"]),
    "threshold_above_one": (G + MISTRAL + ["--threshold", "1.5"], ["--threshold", "1.5", "[0, 1]"]),
    "threshold_nan": (G + MISTRAL + ["--threshold", "nan"], ["--threshold", "nan", "[0, 1]"]),
    "threshold_count": (G + MISTRAL + ["--exits", "1,2", "--threshold", "0.5,0.5,0.5"],
                        ["3 thresholds for 2 exit points"]),
    "prompt_empty": (["generate", ""] + MISTRAL, ["empty prompt"]),
    "prompt_whitespace": (["generate", "  \n\t "] + MISTRAL, ["empty prompt"]),
    "prompt_file_missing": (["generate", "--file", "/nonexistent/prompt.txt"] + MISTRAL,
                            ["/nonexistent/prompt.txt", "cannot read"]),
    "policy_unknown": (G + MISTRAL + ["--policy", "teleport"], ["teleport", "policy"]),
    "exit_output_unknown": (G + MISTRAL + ["--exit-output", "sideways"], ["sideways", "exit output"]),
    "head_kind_unknown": (G + MISTRAL + ["--head", "entropy"], ["entropy", "head kind"]),
    "classifier_without_heads": (G + MISTRAL + ["--head", "classifier"], ["classifier", "--heads"]),
    "unknown_subcommand": (["frobnicate"], ["frobnicate", "invalid choice"]),
    "no_subcommand": ([], ["command"]),
    "unknown_option": (G + MISTRAL + ["--bogus"], ["--bogus"]),
    "max_new_tokens_zero": (G[:2] + MISTRAL + ["--max-new-tokens", "0"], ["--max-new-tokens", "0", ">= 1"]),
    "max_new_tokens_not_int": (G[:2] + MISTRAL + ["--max-new-tokens", "x"], ["--max-new-tokens", "'x'"]),
    "top_p_zero": (G + MISTRAL + ["--top-p", "0"], ["--top-p", "(0, 1]"]),
    "temperature_negative": (G + MISTRAL + ["--temperature", "-1"], ["temperature", "-1"]),
    "dtype_unknown": (G + MISTRAL + ["--dtype", "int3"], ["int3", "dtype"]),
    "bench_exit_out_of_range": (["bench", "--backbone", "random:llama", "--exits", "1,7", "--tokens", "2",
                                 "--repeats", "1"], ["[7]", "out of range"]),
    "info_unknown_backbone": (["info", "--backbone", "random:nosuchshape"], ["nosuchshape"]),
    "ssm_state_unknown": (G + MISTRAL + ["--ssm-state", "bf16"], ["--ssm-state", "'bf16'", "float32"]),
    "bench_switch_unknown": (["bench", "--backbone", "random:llama", "--tokens", "2", "--switches", "cublas,turbo"],
                             ["--switches", "turbo", "launches"]),
}


def assert_one_line_error(rc, out, err, words):
    assert rc == 2, (rc, err)
    assert out == ""
    assert err.startswith("meestral: error:") and "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected exactly one line on stderr, got {err!r}"
    for w in words:
        assert w in err, f"{w!r} not named in {err!r}"


@pytest.mark.parametrize("name", list(ERRORS))
def test_user_error_in_process(name, tmp_path, capsys, monkeypatch):
    argv, words = ERRORS[name]
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main(argv, capsys)
    assert_one_line_error(rc, out, err, words)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def heads_dirs(tmp_path_factory):
    """A heads folder saved for random:mistral:seed1 and a corrupted one."""
    from meestral.backbones.loading import load_backbone

    root = tmp_path_factory.mktemp("heads")
    ExitHeads("classifier", [1, 3], load_backbone("random:mistral:seed1")).save(root / "seed1")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "heads.json").write_text("{ not json")
    (root / "corrupt" / "heads.safetensors").write_bytes(b"\0" * 16)
    return root


@pytest.mark.parametrize("which,words", [
    ("seed1", ["random:mistral:seed1", "random:mistral:seed0", "fingerprint"]),
    ("corrupt", ["heads.json", "corrupted"]),
    ("missing", ["missing", "heads.json"]),
])
def test_heads_of_another_backbone_or_corrupted(which, words, heads_dirs, capsys):
    folder = heads_dirs / which
    before = tree(heads_dirs)
    rc, out, err = run_main(G + MISTRAL + ["--heads", str(folder)], capsys)
    assert_one_line_error(rc, out, err, words + [str(folder)])
    assert tree(heads_dirs) == before


def test_heads_of_the_right_backbone_are_used(heads_dirs, capsys):
    rc, out, err = run_main(gen_args("random:mistral:seed1", "--heads", str(heads_dirs / "seed1"),
                                     "--threshold", "0.5"), capsys)
    assert rc == 0, err
    d = one_json_object(out)
    assert d["heads"]["kind"] == "classifier" and d["heads"]["exit_points"] == [1, 3]
    # untrained classifier heads (confidence ~0.02) never exit
    assert all(t["exit_layer"] == L - 1 for t in d["tokens"])


@slow
@pytest.mark.parametrize("argv,words", [
    (G + MISTRAL + ["--exits", "99"], ["99", "out of range"]),  # after loading a backbone
    (G + ["--backbone", "/nonexistent/dir"], ["/nonexistent/dir"]),
    (["frobnicate"], ["frobnicate"]),  # argparse's own error path
], ids=["exits99", "backbone_path", "subcommand"])
def test_user_error_end_to_end(argv, words, tmp_path):
    rc, out, err = run_sub(argv, tmp_path)
    assert_one_line_error(rc, out, err, words)
    assert os.listdir(tmp_path) == []


def test_malformed_random_seed(capsys):
    rc, out, err = run_main(G + ["--backbone", "random:mistral:seedX"], capsys)
    assert_one_line_error(rc, out, err, ["seed"])


@pytest.mark.parametrize("choice", ["float32", "model"])
def test_ssm_state_option_chooses_the_mamba2_state_dtype(choice, monkeypatch, capsys):
    """--ssm-state: the recurrent state a bf16 Mamba-2 model decodes with (ssm.STATE_IN_MODEL_DTYPE)."""
    import torch

    from meestral.backbones import ssm

    monkeypatch.setattr(ssm, "STATE_IN_MODEL_DTYPE", choice == "float32")  # the other choice first (restored after)
    seen = []
    new_state = ssm.SSMBackbone.new_state

    def spy(self, *a, **kw):
        state = new_state(self, *a, **kw)
        seen.extend(s.dtype for s in state.ssm)
        return state

    monkeypatch.setattr(ssm.SSMBackbone, "new_state", spy)
    rc, out, err = run_main(G + ["--backbone", "random:mamba2", "--dtype", "bfloat16", "--head", "full",
                                 "--ssm-state", choice, "--no-color"], capsys)
    assert rc == 0, err
    assert seen and set(seen) == {torch.float32 if choice == "float32" else torch.bfloat16}


# ---- info and bench ---------------------------------------------------------------------------
@slow
def test_info(tmp_path):
    rc, out, err = run_sub(["info", "--backbone", "random:mamba"], tmp_path)
    assert rc == 0, err
    d = json.loads(out)
    assert d["identity"]["num_layers"] == L
    assert d["identity"]["arch"] == "mamba" and d["family"] == "ssm"
    assert len(d["layer_params"]) == L and all(p > 0 for p in d["layer_params"])
    assert d["full_token_weight_bytes"] > 0


def check_bench_lines(out):
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == 10, out
    pols = ["copy", "propagate", "catchup", "verify"]
    assert [(r["case"], r["policy"]) for r in rows] == [("full", "-")] + [
        (f"exit@{e}", p) for e in (2, 4) for p in pols] + [("hf_generate", "-")]
    assert rows[0]["speedup_vs_full"] == 1.0 and rows[0]["weight_bytes_ratio"] == 1.0
    assert rows[0]["mean_layers_run"] == L and rows[-1]["mean_layers_run"] == L
    assert rows[-1]["weight_bytes_ratio"] == 1.0 and rows[-1]["ms_per_token"] > 0
    for r in rows[1:-1]:
        if r["policy"] == "verify":  # random drafts are rejected: verification costs more than it saves
            assert r["deep_passes_per_token"] > 0
            continue
        assert 0 < r["weight_bytes_ratio"] < 1, r
        if r["policy"] == "catchup":  # every max_backlog+1-th token is forced deep
            assert 0 < r["deep_passes_per_token"] < 1
            continue
        assert r["mean_layers_run"] == int(r["case"].removeprefix("exit@")) + 1
        assert r["decoded_tokens"] == 3
    return rows


@slow
def test_bench(tmp_path):
    rc, out, err = run_sub(["bench", "--backbone", "random:llama", "--tokens", "4", "--repeats", "1", "--max-backlog", "1"], tmp_path)
    assert rc == 0, err
    check_bench_lines(out)
    assert os.listdir(tmp_path) == []


def test_bench_in_process_honours_redirected_stdout(capsys):
    rc, out, err = run_main(["bench", "--backbone", "random:llama", "--tokens", "4", "--repeats", "1", "--max-backlog", "1"], capsys)
    assert rc == 0, err
    check_bench_lines(out)
