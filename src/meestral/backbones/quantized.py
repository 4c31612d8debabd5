"""Quantised storage of a Hugging Face model in one GGUF file, dequantised at load.

Used for the embedded backbones the project trains itself (`mamba2-smol`): the repository holds
their weights, and Q8_0 (blocks of 32 int8 values with one fp16 scale, 8.5 bits a weight) keeps a
40M-parameter model under 48 MiB at a measured, small quality cost (see the model card).

The file is an ordinary GGUF written and read with the `gguf` package (the library llama.cpp
ships for Python), but not a llama.cpp model: tensors keep their Hugging Face state-dict names and
the HF config travels as JSON in the metadata, so loading is `config -> from_config ->
load_state_dict`, with no name mapping to maintain. Matrices whose rows split into whole Q8_0
blocks are quantised; everything else (norms, conv kernels, A_log, D, dt_bias) stays float32.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from meestral.errors import MeestralError
from meestral.files import atomic_write

ARCH = "meestral-hf"  # general.architecture: marks the file as ours, not a llama.cpp model
KEY_CONFIG = f"{ARCH}.config"  # the HF config as JSON
KEY_TIED = f"{ARCH}.tied"  # JSON list of [alias, source] state-dict names left out (tied weights)
KEY_SHA = f"{ARCH}.tensor_sha256"  # hash of the stored tensor bytes, checked at load


def _quantisable(name: str, t: torch.Tensor, block: int) -> bool:
    return t.dim() == 2 and t.shape[-1] % block == 0 and name.endswith(".weight") and t.numel() >= 4096


def save_gguf(model, path: str | Path, qtype: str = "Q8_0") -> dict:
    """Write `model` (an HF PreTrainedModel) to `path` atomically; returns a summary of sizes."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    qt = getattr(GGMLQuantizationType, qtype)
    block = gguf.GGML_QUANT_SIZES[qt][0]
    path = Path(path)
    state = model.state_dict()
    tied = []
    ptrs = {}
    for name, t in state.items():  # tied weights share storage: keep the first name only
        key = (t.data_ptr(), tuple(t.shape))
        if key in ptrs:
            tied.append([name, ptrs[key]])
        else:
            ptrs[key] = name
    dropped = {a for a, _ in tied}
    writer_box = {}

    def write(tmp):
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer_box["w"] = writer
        cfg = model.config.to_dict()
        cfg.pop("_name_or_path", None)
        writer.add_string(KEY_CONFIG, json.dumps(cfg, sort_keys=True))
        writer.add_string(KEY_TIED, json.dumps(tied))
        sha = hashlib.sha256()
        counts = {"q": 0, "f": 0}
        for name, t in state.items():
            if name in dropped:
                continue
            arr = t.detach().float().cpu().numpy()
            if _quantisable(name, t, block):
                data = quants.quantize(arr, qt)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
                counts["q"] += t.numel()
            else:
                data = np.ascontiguousarray(arr, dtype=np.float32)
                writer.add_tensor(name, data)
                counts["f"] += t.numel()
            sha.update(name.encode())
            sha.update(np.ascontiguousarray(data).tobytes())
        writer.add_string(KEY_SHA, sha.hexdigest())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        writer_box.update(counts)

    atomic_write(path, write)
    n_q, n_f = writer_box["q"], writer_box["f"]
    return {"path": str(path), "bytes": path.stat().st_size, "quantised_params": n_q, "float_params": n_f,
            "qtype": qtype}


def load_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, float32 state dict) from a file written by `save_gguf`.

    The tensor bytes are hashed and compared with the hash stored at save time, so a damaged file
    fails here with a clear message instead of loading silently wrong weights."""
    import gguf
    from gguf import quants

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise MeestralError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): rebuild or re-fetch it") from None

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            raise MeestralError(f"{path} lacks {key}: it was not written by meestral.backbones.quantized.save_gguf")
        return bytes(f.parts[f.data[0]]).decode("utf-8")

    cfg = json.loads(field(KEY_CONFIG))
    tied = json.loads(field(KEY_TIED))
    sha = hashlib.sha256()
    state = {}
    for t in reader.tensors:
        raw = np.asarray(t.data)
        sha.update(t.name.encode())
        sha.update(np.ascontiguousarray(raw).tobytes())
        arr = quants.dequantize(raw, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        state[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
    if sha.hexdigest() != field(KEY_SHA):
        raise MeestralError(f"{path} is damaged (tensor checksum mismatch): rebuild or re-fetch it")
    for alias, source in tied:
        state[alias] = state[source]
    return cfg, state


def model_from_gguf(path: str | Path, dtype=torch.float32):
    """An HF causal LM rebuilt from a `save_gguf` file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict, state = load_gguf(path)
    mt = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(mt, **{k: v for k, v in cfg_dict.items() if k not in ("transformers_version",)})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
