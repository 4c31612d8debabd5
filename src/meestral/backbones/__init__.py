"""Backbone adapters: one per architecture family, one shared interface.

    base.py         the Backbone interface: embed, run block i with its state, final norm, LM head, state ops
    transformer.py  Mistral / Llama (HF blocks + a slot K/V cache)
    ssm.py          Mamba-2 / Mamba-1 (HF weights + an explicit recurrence)
    ssd.py          Mamba-2's chunked scan as batched matmuls (training, scoring, prompt passes)
    loading.py      specs -> backbones: embedded, random shapes, HF folder / hub id, GGUF
    native.py       Mistral's native format (params.json + consolidated.safetensors)
    tokenizer.py    one tokenizer interface over HF's and Mistral's
    quantized.py    Q8_0 GGUF storage of an HF model (the shipped Mamba-2)
    lora.py         LoRA adapters as forward hooks on HF modules; merge, save, load
    assets.py       the embedded SmolLM2 and mamba2-smol, and the cache folder
"""

from meestral.backbones.base import Backbone, LayerCost, Step
from meestral.backbones.loading import load_backbone, wrap

__all__ = ["Backbone", "LayerCost", "Step", "load_backbone", "wrap"]
