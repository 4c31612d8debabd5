"""Mistral's native checkpoint format, loaded straight into the equivalent HF model.

Mistral ships some models (Mistral-7B-v0.3, Mamba-Codestral-7B-v0.1) as `params.json` +
`consolidated.safetensors` + `tokenizer.model.v3` / `tekken.json`. We translate the config and
the tensor names in memory instead of asking the user to run HF's conversion scripts:

- Transformer checkpoints become `MistralForCausalLM`. Native wq/wk rows are laid out for
  rotary embeddings applied to *adjacent* pairs (x0,x1), (x2,x3)... (complex multiplication),
  while HF rotates the two *halves* of each head (x_i, x_{i+d/2}). Permuting the rows of wq and
  wk per head makes both conventions compute the same attention scores.
- Codestral Mamba checkpoints become `Mamba2ForCausalLM`. Tensor names already follow HF's
  except the embedding; sizes HF wants in its config (state size, heads, kernel) are read off
  the tensor shapes, since params.json does not carry them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from meestral.errors import MeestralError
from meestral.backbones.tokenizer import ByteTokenizer, MistralCommonTokenizer, bundled_mistral_v3_path

# Native transformer names -> HF MistralForCausalLM names.
_MISTRAL_NAMES = [
    (r"tok_embeddings\.weight", r"model.embed_tokens.weight"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
]

# params.json features whose weights or maths this loader does not reproduce.
_UNSUPPORTED = {
    "moe": "mixture-of-experts (Mixtral-style)",
    "vision_encoder": "vision encoder (Pixtral-style)",
    "yarn": "YaRN rope scaling",
    "rope_scaling": "rope scaling",
    "quantization": "quantized weights",
}


def load_native(path, dtype: torch.dtype | None = None, device="cpu"):
    """(HF causal LM, Tokenizer) for a Mistral native checkpoint folder."""
    path = Path(path).expanduser()
    params = _read_params(path)
    tensors = _read_tensors(path, device)
    if _is_mamba(params, tensors):
        cfg, state = _mamba2_config(params, tensors), _mamba2_state(tensors)
        vocab = state["backbone.embeddings.weight"].shape[0]
    elif "tok_embeddings.weight" in tensors:
        cfg = _mistral_config(params, tensors)
        state = _mistral_state(tensors, cfg)
        vocab = cfg.vocab_size
    else:
        raise MeestralError(
            f"{path}: unknown native layout (no tok_embeddings.weight, no backbone.* tensors): "
            "give a Mistral transformer or Codestral Mamba checkpoint, or an HF folder with config.json"
        )
    tok = native_tokenizer(path, vocab)
    # Generation stops on the tokenizer's EOS; keep the HF config in agreement with it.
    cfg.bos_token_id = tok.bos_id
    cfg.eos_token_id = min(tok.eos_ids) if tok.eos_ids else None
    cfg.pad_token_id = None
    model = _build(cfg, state, dtype or torch.float32, device, path)
    return model, tok


# ---- files -----------------------------------------------------------------------------------
def _read_params(path: Path) -> dict:
    try:
        params = json.loads((path / "params.json").read_text())
    except (OSError, ValueError) as e:
        raise MeestralError(f"cannot read {path / 'params.json'}: {e}") from None
    if not isinstance(params, dict):
        raise MeestralError(f"{path / 'params.json'} is not a JSON object: give Mistral's params.json")
    for key, what in _UNSUPPORTED.items():
        if params.get(key):
            raise MeestralError(f"{path}: params.json declares {what} ({key!r}), which MEEstral does not "
                                "support: use a dense Mistral or Codestral Mamba checkpoint")
    return params


def _weight_files(path: Path) -> list[Path]:
    """consolidated.safetensors, or its shards (consolidated-00001-of-00002.safetensors...)."""
    files = sorted(path.glob("consolidated*.safetensors"))
    if files:
        return files
    if list(path.glob("consolidated*.pth")):
        raise MeestralError(f"{path} holds consolidated*.pth (pickle) weights: only consolidated.safetensors "
                            "is read; download the safetensors version of the checkpoint")
    raise MeestralError(f"{path} has params.json but no consolidated.safetensors: "
                        "download the weights file into the same folder")


def _read_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name in tensors:
                        raise MeestralError(f"{file}: tensor {name} also appears in another shard: "
                                            "remove the stray consolidated*.safetensors file")
                    tensors[name] = f.get_tensor(name)
        except MeestralError:
            raise
        except Exception as e:  # truncated download, not a safetensors file...
            raise MeestralError(f"cannot read {file}: {str(e).splitlines()[0]} (re-download it)") from None
    return tensors


def native_tokenizer(path: Path, vocab_size: int):
    """The folder's own tokenizer file, else a stand-in that fits a `vocab_size`-token model."""
    candidates = [path / "tekken.json", *sorted(path.glob("tokenizer.model.v*"), reverse=True),
                  path / "tokenizer.model"]
    found = next((f for f in candidates if f.is_file()), None)
    if found is None and vocab_size == ByteTokenizer().vocab_size:
        return ByteTokenizer()  # the tiny random test models' vocabulary
    if found is None:
        found = _bundled_v3_file(path, vocab_size)
    try:
        tok = MistralCommonTokenizer(found)
    except ImportError as e:  # mistral_common itself, or sentencepiece for .model files
        missing = e.name or "mistral_common"
        raise MeestralError(f"reading {found.name} needs {missing}: pip install {missing}") from None
    except Exception as e:
        raise MeestralError(f"cannot read tokenizer {found}: {str(e).splitlines()[0]}") from None
    if tok.vocab_size > vocab_size:
        raise MeestralError(f"{path}: {found.name} has {tok.vocab_size} tokens but the model only {vocab_size}: "
                            "put the checkpoint's own tokenizer.model.v3 or tekken.json in the folder")
    return tok


def _bundled_v3_file(path: Path, vocab_size: int) -> Path:
    """Mistral's v3 tokenizer as shipped inside the mistral_common wheel.

    Both models this format targets (Mistral-7B-v0.3, Codestral Mamba) use that 32,768-token
    vocabulary, so it stands in when the folder lacks its tokenizer file. The wheel names it
    e.g. `mistral_instruct_tokenizer_240323.model.v3`, hence the loose pattern.
    """
    fix = "put the checkpoint's tokenizer.model.v3 or tekken.json in the folder"
    if vocab_size != 32768:
        raise MeestralError(f"{path} has no tokenizer file and a {vocab_size}-token vocabulary: {fix}")
    found = bundled_mistral_v3_path()
    if found is None:
        raise MeestralError(f"{path} has no tokenizer file and mistral_common (which ships Mistral's v3 "
                            f"tokenizer) is not installed: pip install mistral_common, or {fix}")
    return found


# ---- Mistral (transformer) -------------------------------------------------------------------
def _need(params: dict, *keys: str):
    missing = [k for k in keys if k not in params]
    if missing:
        raise MeestralError(f"params.json lacks {', '.join(missing)}: not a Mistral native params.json "
                            "(expected dim, n_layers, n_heads, ...)")
    return [params[k] for k in keys]


def _mistral_config(params: dict, tensors: dict):
    from transformers import MistralConfig

    dim, n_layers, n_heads = _need(params, "dim", "n_layers", "n_heads")
    vocab = tensors["tok_embeddings.weight"].shape[0]
    if params.get("vocab_size", vocab) != vocab:
        raise MeestralError(f"params.json says vocab_size {params['vocab_size']} but tok_embeddings.weight "
                            f"has {vocab} rows: params.json and consolidated.safetensors do not belong together")
    window = params.get("sliding_window")
    if isinstance(window, list):
        raise MeestralError("params.json has per-layer sliding windows, which MEEstral does not support")
    w1 = tensors.get("layers.0.feed_forward.w1.weight")
    return MistralConfig(
        hidden_size=dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads", n_heads),
        head_dim=params.get("head_dim") or dim // n_heads,
        intermediate_size=params.get("hidden_dim") or (w1.shape[0] if w1 is not None else 4 * dim),
        rms_norm_eps=params.get("norm_eps", 1e-5),
        vocab_size=vocab,
        rope_theta=float(params.get("rope_theta", 10000.0)),
        sliding_window=int(window) if window else None,
        # Not in params.json for 7B v0.3; 32k is what Mistral's own HF config states.
        max_position_embeddings=params.get("max_seq_len", 32768),
        tie_word_embeddings="output.weight" not in tensors,
    )


def rotary_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a native wq/wk so rotating halves (HF) equals rotating adjacent pairs.

    Within each head, native row 2i+j (pair i, member j) becomes HF row j*head_dim/2 + i.
    """
    rows, cols = w.shape
    if rows != n_heads * head_dim or head_dim % 2:
        raise MeestralError(f"attention weight of shape {tuple(w.shape)} does not fit {n_heads} heads of "
                            f"size {head_dim}: params.json and consolidated.safetensors do not belong together")
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_name(name: str) -> str:
    for pattern, repl in _MISTRAL_NAMES:
        new, n = re.subn(f"^{pattern}$", repl, name)
        if n:
            return new
    raise MeestralError(f"unexpected tensor {name!r} in consolidated.safetensors: this loader reads dense "
                        "Mistral transformer checkpoints only (no LoRA, MoE or vision weights)")


def _mistral_state(tensors: dict, cfg) -> dict[str, torch.Tensor]:
    state = {}
    for name in list(tensors):
        w = tensors.pop(name)  # pop: the native copy is freed as soon as it is converted
        new = _hf_name(name)
        if new.endswith("q_proj.weight"):
            w = rotary_to_hf(w, cfg.num_attention_heads, cfg.head_dim)
        elif new.endswith("k_proj.weight"):
            w = rotary_to_hf(w, cfg.num_key_value_heads, cfg.head_dim)
        state[new] = w
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


# ---- Codestral Mamba (Mamba-2) ---------------------------------------------------------------
def _is_mamba(params: dict, tensors: dict) -> bool:
    return (params.get("model_type") == "mamba" or "n_groups" in params
            or any(name.startswith("backbone.") for name in tensors))


def _mamba2_config(params: dict, tensors: dict):
    from transformers import Mamba2Config

    dim, n_layers = _need(params, "dim", "n_layers")
    mixer = "backbone.layers.0.mixer."
    needed = ["A_log", "conv1d.weight", "in_proj.weight", "norm.weight"]
    missing = [mixer + k for k in needed if mixer + k not in tensors]
    if missing or "backbone.embedding.weight" not in tensors:
        raise MeestralError(f"Mamba checkpoint lacks {(missing or ['backbone.embedding.weight'])[0]}: "
                            "expected Codestral Mamba (Mamba-2) tensor names")
    a_log = tensors[mixer + "A_log"]
    if a_log.dim() != 1:
        raise MeestralError("this is a Mamba-1 native checkpoint (2-D A_log): only Mamba-2 (Codestral Mamba) "
                            "is read natively; convert it to an HF folder")
    heads = a_log.shape[0]
    conv_dim, _, kernel = tensors[mixer + "conv1d.weight"].shape
    inner = tensors[mixer + "norm.weight"].shape[0]  # the gated norm spans the expanded width
    groups = params.get("n_groups", 1)
    state_size, rest = divmod(conv_dim - inner, 2 * groups)
    in_rows = tensors[mixer + "in_proj.weight"].shape[0]
    # in_proj emits [z (inner), x|B|C (conv_dim), dt (heads)]; every size must add up.
    if rest or state_size <= 0 or inner % heads or inner % dim or in_rows != inner + conv_dim + heads:
        raise MeestralError(f"Mamba-2 tensor shapes do not add up (in_proj {in_rows} rows, conv {conv_dim}, "
                            f"inner {inner}, heads {heads}, n_groups {groups}): check n_groups in params.json")
    vocab = tensors["backbone.embedding.weight"].shape[0]
    if params.get("vocab_size", vocab) > vocab:
        raise MeestralError(f"params.json says vocab_size {params['vocab_size']} but backbone.embedding.weight "
                            f"has {vocab} rows: params.json and consolidated.safetensors do not belong together")
    return Mamba2Config(
        hidden_size=dim,
        num_hidden_layers=n_layers,
        vocab_size=vocab,  # already padded to pad_vocab_size_multiple in the tensor
        num_heads=heads,
        head_dim=inner // heads,
        expand=inner // dim,
        state_size=state_size,
        n_groups=groups,
        conv_kernel=kernel,
        use_bias=mixer + "in_proj.bias" in tensors,
        use_conv_bias=mixer + "conv1d.bias" in tensors,
        layer_norm_epsilon=params.get("norm_eps", 1e-5),
        residual_in_fp32=params.get("residual_in_fp32", True),
        tie_word_embeddings=bool(params.get("tie_embeddings", False)) or "lm_head.weight" not in tensors,
    )


def _mamba2_state(tensors: dict) -> dict[str, torch.Tensor]:
    state = {}
    for name in list(tensors):
        if not name.startswith(("backbone.", "lm_head.")):
            raise MeestralError(f"unexpected tensor {name!r} in a Codestral Mamba checkpoint: "
                                "expected backbone.* and lm_head.weight only")
        new = name.replace("backbone.embedding.", "backbone.embeddings.", 1)
        state[new] = tensors.pop(name)
    state.setdefault("lm_head.weight", state["backbone.embeddings.weight"])  # tied embeddings
    return state


# ---- building the HF model ------------------------------------------------------------------
def _build(cfg, state: dict, dtype: torch.dtype, device, path: Path):
    """Instantiate on the meta device (no random init, no second copy of 7B weights), then adopt
    the converted tensors as the parameters."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    expected = model.state_dict()
    _check_shapes(expected, state, path)
    # Cast to what the model itself would hold (a module may keep some parameters in fp32).
    state = {k: v.to(device=device, dtype=expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    _materialise_buffers(model, device)
    if cfg.model_type == "mistral":
        model.config._attn_implementation = "sdpa"
    return model.eval()


def _check_shapes(expected: dict, state: dict, path: Path) -> None:
    """One readable line instead of torch's multi-line load_state_dict report."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad:
        what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                f"{bad[0]} has shape {tuple(state[bad[0]].shape)}, params.json implies {tuple(expected[bad[0]].shape)}")
        count = len(missing) + len(extra) + len(bad)
        raise MeestralError(f"{path}: weights do not match params.json ({what}; {count} problem(s) in all): "
                            "check that params.json and consolidated.safetensors come from the same model")


def _materialise_buffers(model, device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in any checkpoint, so they are
    still on the meta device: rebuild the modules that own them from the config."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not name.endswith("rotary_emb"):
                raise RuntimeError(f"meestral bug: buffer of {name} left on the meta device")
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            # The constructor's `device` keyword differs between 5.x releases; the context works on all.
            with torch.device(device):
                setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=model.config))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"meestral bug: {leftover[0]} left on the meta device")
