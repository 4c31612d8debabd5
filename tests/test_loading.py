"""Backbone specs: HF folders of each architecture, hub ids offline, bad specs."""

import subprocess
import sys

import pytest
import torch

from meestral.backbones.loading import load_backbone
from meestral.errors import MeestralError


def tiny_hf_tokenizer():
    """A four-word HF fast tokenizer, built in memory (no download, no embedded backbone)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("shape", ["mistral", "llama", "mamba2", "mamba"])
def test_hf_folder_of_each_architecture(tiny, shape, tmp_path):
    """A folder written by save_pretrained (plus a tokenizer) loads, and computes what the original does."""
    src = tiny(shape)
    src.model.save_pretrained(tmp_path)
    tiny_hf_tokenizer().save_pretrained(tmp_path)  # any HF tokenizer will do for loading
    bb = load_backbone(str(tmp_path))
    assert bb.arch == src.arch and bb.num_layers == src.num_layers
    assert bb.fingerprint() == src.fingerprint()
    ids = torch.randint(3, src.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bb.full_logits(ids), src.full_logits(ids))


@pytest.mark.slow  # spawns the entry point
def test_hub_id_offline_is_one_clear_line():
    code = ("from meestral.cli.main import main; import sys; "
            "sys.exit(main(['info', '--backbone', 'mistralai/Mistral-7B-v0.3']))")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp/meestral-test-home"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meestral: error: cannot load backbone"), r.stderr


def test_folder_without_config_or_params(tmp_path):
    with pytest.raises(MeestralError, match="neither config.json"):
        load_backbone(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(MeestralError, match="supports"):
        load_backbone(str(tmp_path))
