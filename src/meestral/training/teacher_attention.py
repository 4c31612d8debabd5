"""A teacher's attention while it samples: one new token a row against its K/V cache, the query
heads that share a K/V head attending to that head as it is stored, never to copies of it.

HF's sdpa attention repeats every K/V head once per query head sharing it (`repeat_kv`) whenever it
is given a mask, and a batch of left-padded prompts or a static cache always gives one: SmolLM2's 9
query heads over 3 K/V heads then write and read three copies of the whole cache in every layer at
every token step. The sampler's step grew linearly with the batch on an H100 (73 ms at 2,048 rows,
278 ms at 8,192: 28-29k tokens/s whatever the batch, benchmarks/NOTES.md 2026-12-08). For one query
token, the r query heads of a K/V head are r query positions of that head: one
`scaled_dot_product_attention` over the cache as stored, the row's mask broadcast over them (the
same products and sums as the repeated heads). Prompts (several tokens) take HF's own sdpa.

Registered through transformers' public `AttentionInterface` / `AttentionMaskInterface` (the
masks are sdpa's), and switched on per model with `use`.
"""

from __future__ import annotations

import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "meestral_packed_gqa"


def packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF's attention-function signature: query [B, H, q, d], key / value [B, Hkv, L, d], mask
    [B, 1, q, L] (bool or additive) or None; returns ([B, q, H, d], None)."""
    B, H, q, d = query.shape
    kv = key.shape[1]
    if q != 1 or kv == H or dropout or H % kv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    # query head h = j * r + i attends to K/V head j (repeat_kv's order): [B, Hkv, r, d]
    out = F.scaled_dot_product_attention(query.reshape(B, kv, H // kv, d), key, value, attn_mask=mask, scale=scaling)
    return out.reshape(B, 1, H, d), None


def register():
    """Make NAME an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_gqa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use(model, on: bool = True) -> bool:
    """Switch an HF attention model with grouped K/V heads to the packed attention (on) or back to
    sdpa; returns whether its implementation is now NAME. Models without grouped heads, or that
    cannot switch their attention, keep theirs."""
    cfg = model.config
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if not on:
        if cfg._attn_implementation == NAME:
            model.set_attn_implementation("sdpa")
        return False
    if not heads or not kv or kv == heads:
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):  # a model that takes no custom attention keeps its own
        return False
    return cfg._attn_implementation == NAME
