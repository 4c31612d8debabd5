"""Mistral's native checkpoint format (params.json + consolidated.safetensors) loads exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from meestral.backbones.loading import load_backbone, random_backbone
from meestral.backbones.native import rotary_to_hf
from meestral.errors import MeestralError
from meestral.backbones.tokenizer import ByteTokenizer, MistralCommonTokenizer

# HF MistralForCausalLM name -> native name (the inverse of the loader's mapping).
_TO_NATIVE = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    (".self_attn.q_proj.", ".attention.wq."),
    (".self_attn.k_proj.", ".attention.wk."),
    (".self_attn.v_proj.", ".attention.wv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_proj.", ".feed_forward.w1."),
    (".mlp.down_proj.", ".feed_forward.w2."),
    (".mlp.up_proj.", ".feed_forward.w3."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    ("model.layers.", "layers."),
]


def hf_to_rotary(w, n_heads, head_dim):
    """Undo `rotary_to_hf`: HF row j*head_dim/2 + i goes back to native row 2i + j."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_native_mistral(model, folder: Path, tie=False) -> Path:
    cfg = model.config
    tensors = {}
    for name, w in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        if "q_proj" in name:
            w = hf_to_rotary(w, cfg.num_attention_heads, cfg.head_dim)
        elif "k_proj" in name:
            w = hf_to_rotary(w, cfg.num_key_value_heads, cfg.head_dim)
        for old, new in _TO_NATIVE:
            name = name.replace(old, new)
        tensors[name] = w.contiguous().clone()
    params = dict(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, head_dim=cfg.head_dim,
                  hidden_dim=cfg.intermediate_size, n_heads=cfg.num_attention_heads,
                  n_kv_heads=cfg.num_key_value_heads, norm_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size,
                  rope_theta=cfg.rope_parameters["rope_theta"])
    if cfg.sliding_window:
        params["sliding_window"] = cfg.sliding_window
    return _write(folder, params, tensors)


def write_native_mamba2(model, folder: Path) -> Path:
    cfg = model.config
    tensors = {k.replace("backbone.embeddings.", "backbone.embedding."): w.contiguous().clone()
               for k, w in model.state_dict().items()}
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
              "n_groups": cfg.n_groups, "rms_norm": True, "residual_in_fp32": cfg.residual_in_fp32,
              "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": False,
              "model_type": "mamba"}
    return _write(folder, params, tensors)


def _write(folder: Path, params: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    save_file(tensors, str(folder / "consolidated.safetensors"))
    return folder


def _ids(vocab, seed=1, shape=(2, 13)):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", ["mistral", "mistral-sw", "mamba2"])
def test_native_round_trip_gives_same_logits(tmp_path, shape):
    ref = random_backbone(shape, seed=4)
    writer = write_native_mamba2 if shape == "mamba2" else write_native_mistral
    folder = writer(ref.model, tmp_path / shape)
    bb = load_backbone(str(folder))
    assert type(bb) is type(ref) and bb.num_layers == ref.num_layers
    assert bb.config.model_type == ref.config.model_type
    if shape == "mamba2":
        for key in ("state_size", "num_heads", "head_dim", "n_groups", "conv_kernel", "expand"):
            assert getattr(bb.config, key) == getattr(ref.config, key), key
    else:
        assert bb.config.sliding_window == ref.config.sliding_window
    assert isinstance(bb.tokenizer, ByteTokenizer)  # no tokenizer file and a 259-token vocabulary
    ids = _ids(ref.vocab_size)
    torch.testing.assert_close(bb.full_logits(ids), ref.full_logits(ids), atol=1e-5, rtol=1e-5)


def test_native_tied_embeddings(tmp_path):
    ref = random_backbone("mistral", seed=5)
    ref.model.lm_head.weight = ref.model.model.embed_tokens.weight
    bb = load_backbone(str(write_native_mistral(ref.model, tmp_path / "tied", tie=True)))
    assert bb.config.tie_word_embeddings
    assert bb.model.lm_head.weight.data_ptr() == bb.model.model.embed_tokens.weight.data_ptr()
    ids = _ids(ref.vocab_size)
    torch.testing.assert_close(bb.full_logits(ids), ref.full_logits(ids), atol=1e-5, rtol=1e-5)


def test_native_dtype_and_no_meta_tensors(tmp_path):
    ref = random_backbone("mistral", seed=6)
    bb = load_backbone(str(write_native_mistral(ref.model, tmp_path / "m")), dtype="bfloat16")
    assert bb.dtype == torch.bfloat16
    assert not any(t.is_meta for t in [*bb.model.parameters(), *bb.model.buffers()])
    assert bb.full_logits(_ids(ref.vocab_size)).isfinite().all()


def _interleaved_rotary(q, pos, theta):
    """Mistral's reference rotary: adjacent pairs (x[2i], x[2i+1]) as one complex number, rotated
    by pos * theta**(-2i/d). q: [T, H, d]; pos: [T]."""
    d = q.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = pos[:, None].double() * freqs[None, :]  # [T, d/2]
    rot = torch.polar(torch.ones_like(angle), angle)[:, None, :]
    qc = torch.view_as_complex(q.double().reshape(*q.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(qc * rot).reshape(q.shape)


def test_rotary_permutation_matches_interleaved_convention():
    """Independent of the round trip: native weights + complex-pair rotary give the same attention
    scores as permuted weights + HF's own rotate-half rotary module."""
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

    n_heads, n_kv, head_dim, dim, theta, T = 4, 2, 16, 48, 10000.0, 7
    cfg = MistralConfig(hidden_size=dim, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                        head_dim=head_dim, rope_theta=theta)
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(n_heads * head_dim, dim, generator=g, dtype=torch.float64)
    wk = torch.randn(n_kv * head_dim, dim, generator=g, dtype=torch.float64)
    x = torch.randn(T, dim, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 5, 17, 100, 1000])

    q_nat = _interleaved_rotary((x @ wq.T).view(T, n_heads, head_dim), pos, theta)
    k_nat = _interleaved_rotary((x @ wk.T).view(T, n_kv, head_dim), pos, theta)

    q_hf = (x @ rotary_to_hf(wq, n_heads, head_dim).T).view(1, T, n_heads, head_dim).transpose(1, 2)
    k_hf = (x @ rotary_to_hf(wk, n_kv, head_dim).T).view(1, T, n_kv, head_dim).transpose(1, 2)
    cos, sin = MistralRotaryEmbedding(cfg)(x[None].float(), pos[None])
    q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos.double(), sin.double())

    group = n_heads // n_kv  # GQA: query head h reads key head h // group
    for h in range(n_heads):
        nat = q_nat[:, h] @ k_nat[:, h // group].T  # [T, T] scores, every position pair
        hf = q_hf[0, h] @ k_hf[0, h // group].T
        # HF builds cos/sin in float32: at position 1000 that costs ~1e-5 relative error.
        torch.testing.assert_close(hf, nat, rtol=1e-4, atol=1e-4 * nat.abs().max().item())


# ---- tokenizers ---------------------------------------------------------------------------------
def _v3_file() -> Path:
    import mistral_common

    hits = sorted(Path(mistral_common.__file__).parent.rglob("*.model.v3"))
    if not hits:
        pytest.skip("mistral_common ships no tokenizer.model.v3")
    return hits[0]


def _mistral_32k(seed=0):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=32768, sliding_window=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def test_native_tokenizer_file_is_used(tmp_path):
    folder = write_native_mistral(_mistral_32k(), tmp_path / "m")
    shutil.copy(_v3_file(), folder / "tokenizer.model.v3")
    bb = load_backbone(str(folder))
    assert isinstance(bb.tokenizer, MistralCommonTokenizer) and bb.tokenizer.vocab_size == 32768
    assert bb.config.eos_token_id == 2 and bb.config.bos_token_id == 1
    assert bb.tokenizer.encode("Hello")[0] == 1


def test_native_falls_back_to_v3_tokenizer(tmp_path):
    bb = load_backbone(str(write_native_mistral(_mistral_32k(), tmp_path / "m")))
    assert isinstance(bb.tokenizer, MistralCommonTokenizer) and bb.tokenizer.vocab_size == 32768
    # The same text encodes the same way as with the wheel's v3 file given explicitly.
    assert bb.tokenizer.encode("Hello world") == MistralCommonTokenizer(_v3_file()).encode("Hello world")


def test_no_tokenizer_for_an_unknown_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=1000, sliding_window=None)
    folder = write_native_mistral(AutoModelForCausalLM.from_config(cfg), tmp_path / "m")
    with pytest.raises(MeestralError, match="no tokenizer file and a 1000-token vocabulary"):
        load_backbone(str(folder))


def test_tokenizer_larger_than_model_is_refused(tmp_path):
    folder = write_native_mistral(random_backbone("mistral").model, tmp_path / "m")
    shutil.copy(_v3_file(), folder / "tokenizer.model.v3")
    with pytest.raises(MeestralError, match="32768 tokens but the model only 259"):
        load_backbone(str(folder))


# ---- bad input ----------------------------------------------------------------------------------
def _one_line(err):
    assert "\n" not in str(err.value)


def test_missing_weights_file(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(MeestralError, match="no consolidated.safetensors") as err:
        load_backbone(str(tmp_path))
    _one_line(err)


def test_unknown_layout(tmp_path):
    _write(tmp_path, {"dim": 4}, {"encoder.weight": torch.zeros(2, 2)})
    with pytest.raises(MeestralError, match="unknown native layout") as err:
        load_backbone(str(tmp_path))
    _one_line(err)


def test_params_that_do_not_match_the_weights(tmp_path):
    folder = write_native_mistral(random_backbone("mistral").model, tmp_path / "m")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_heads": 8, "head_dim": 16}))
    with pytest.raises(MeestralError, match="do not belong together|do not match params.json") as err:
        load_backbone(str(folder))
    _one_line(err)
    (folder / "params.json").write_text(json.dumps({**params, "hidden_dim": 96}))
    with pytest.raises(MeestralError, match="do not match params.json") as err:
        load_backbone(str(folder))
    _one_line(err)


def test_mamba2_shapes_that_do_not_add_up(tmp_path):
    folder = write_native_mamba2(random_backbone("mamba2").model, tmp_path / "m")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_groups": 3}))
    with pytest.raises(MeestralError, match="do not add up") as err:
        load_backbone(str(folder))
    _one_line(err)


def test_unsupported_features_and_bad_json(tmp_path):
    folder = write_native_mistral(random_backbone("mistral").model, tmp_path / "m")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "moe": {"num_experts": 8}}))
    with pytest.raises(MeestralError, match="mixture-of-experts"):
        load_backbone(str(folder))
    (folder / "params.json").write_text("{not json")
    with pytest.raises(MeestralError, match="cannot read .*params.json"):
        load_backbone(str(folder))


def test_truncated_weights_file(tmp_path):
    folder = write_native_mistral(random_backbone("mistral").model, tmp_path / "m")
    data = (folder / "consolidated.safetensors").read_bytes()
    (folder / "consolidated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MeestralError, match="cannot read .*consolidated.safetensors") as err:
        load_backbone(str(folder))
    _one_line(err)


# ---- the real checkpoints' shapes (meta tensors: no memory, no download) -----------------------
def _meta_hf_model(shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    from meestral.backbones.loading import RANDOM_SHAPES

    kw = dict(RANDOM_SHAPES[shape])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def test_codestral_mamba_7b_shapes_are_inferred():
    from meestral.backbones.native import _mamba2_config

    ref = _meta_hf_model("codestral-mamba-7b")
    tensors = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ref.state_dict().items()}
    # Mamba-Codestral-7B-v0.1's params.json, verbatim.
    params = {"dim": 4096, "n_layers": 64, "vocab_size": 32768, "n_groups": 8, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
              "tie_embeddings": False, "model_type": "mamba"}
    cfg = _mamba2_config(params, tensors)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "num_heads", "head_dim",
                "expand", "n_groups", "conv_kernel", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(ref.config, key), key
    assert (cfg.state_size, cfg.num_heads, cfg.head_dim) == (128, 128, 64)


def test_mistral_7b_v03_config():
    from transformers import AutoModelForCausalLM

    from meestral.backbones.native import _check_shapes, _mistral_config, _mistral_state

    ref = _meta_hf_model("mistral-7b")
    tensors = {}
    for name, w in ref.state_dict().items():
        for old, new in _TO_NATIVE:
            name = name.replace(old, new)
        tensors[name] = w
    # Mistral-7B-v0.3's params.json, verbatim.
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0}
    cfg = _mistral_config(params, tensors)
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.sliding_window is None
    assert not cfg.tie_word_embeddings and cfg.max_position_embeddings == 32768
    state = _mistral_state(tensors, cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    _check_shapes(model.state_dict(), state, Path("mistral-7b"))  # raises on any name or shape mismatch
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (1024, 4096)
