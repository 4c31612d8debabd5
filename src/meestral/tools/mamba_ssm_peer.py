"""mamba-ssm as a peer: the state-space models' own CUDA/Triton decoder, on our backbone's weights.

On a Mamba the strongest full-depth decoder a user can take is not HF's but mamba-ssm's
`MambaLMHeadModel.generate(cg=True)`: its fused Triton / CUDA step kernels (causal-conv1d's conv
update, the selective state update, the gated RMS norm) with the decode step captured as a CUDA
graph. Its PyPI releases are source archives: `benchmarks/build_mamba_ssm.sh` builds the wheels.

`mamba_ssm_model` rebuilds the backbone as a `MambaLMHeadModel` with the same weights: HF's
Mamba / Mamba-2 parameter names are mamba-ssm's, but for the embedding's. `mamba_ssm_ms` times its
greedy decode without perturbing it: mamba-ssm's loop reads nothing back per token (no streamer,
no EOS), so a per-step timestamp would add a device sync it does not have; the decode time is the
difference of two whole generations (prompt + n tokens, prompt + 1 token), per token.
"""

from __future__ import annotations

import statistics
import time

import torch


def mamba_ssm_config(bb) -> dict:
    """MambaConfig's fields for backbone bb (HF Mamba-2 or Mamba)."""
    c = bb.model.config
    if bb.v2:
        ssm = dict(layer="Mamba2", d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand, headdim=c.head_dim,
                   ngroups=c.n_groups, chunk_size=c.chunk_size, bias=c.use_bias, conv_bias=c.use_conv_bias,
                   dt_limit=tuple(float(x) for x in c.time_step_limit), rmsnorm=True, norm_before_gate=False)
    else:
        ssm = dict(layer="Mamba1", d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand,
                   dt_rank=c.time_step_rank, bias=c.use_bias, conv_bias=c.use_conv_bias)
    return dict(d_model=c.hidden_size, n_layer=c.num_hidden_layers, vocab_size=c.vocab_size, ssm_cfg=ssm,
                rms_norm=True, residual_in_fp32=bool(c.residual_in_fp32), fused_add_norm=True,
                pad_vocab_size_multiple=1, tie_embeddings=bool(c.tie_word_embeddings))


def mamba_ssm_state_dict(bb) -> dict:
    """The backbone's parameters under mamba-ssm's names (HF says `embeddings`, mamba-ssm `embedding`)."""
    out = {}
    for k, v in bb.model.state_dict().items():
        out[k.replace("backbone.embeddings.", "backbone.embedding.", 1)] = v
    return out


def mamba_ssm_model(bb):
    """A `MambaLMHeadModel` holding bb's weights (a copy: the peer must not share our buffers)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    if bb.family != "ssm":
        raise ValueError(f"mamba-ssm runs Mamba models only, not a {bb.family}")
    model = MambaLMHeadModel(MambaConfig(**mamba_ssm_config(bb)), device=bb.device, dtype=bb.dtype)
    missing, unexpected = model.load_state_dict(mamba_ssm_state_dict(bb), strict=False)
    # A tied LM head is the embedding: not a separate entry in either model.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto mamba-ssm: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def mamba_ssm_generate(model, ids, tokens: int, cg: bool = True) -> list[int]:
    """Greedy tokens from mamba-ssm's own `generate` (top_k=1), prompt excluded."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(x, max_length=len(ids) + tokens, cg=cg, top_k=1)
    return out[0, len(ids):].tolist()


def mamba_ssm_ms(bb, ids, tokens: int, repeats: int) -> float:
    """Decode ms/token of mamba-ssm's `generate(cg=True)` on bb's weights (median over repeats,
    after a warm-up that captures its graphs)."""
    model = mamba_ssm_model(bb)
    dev = bb.device

    def timed(n):
        _sync(dev)
        t0 = time.perf_counter()
        mamba_ssm_generate(model, ids, n)
        _sync(dev)
        return time.perf_counter() - t0

    try:
        timed(tokens)  # warm-up: Triton compiles, the decode graph is captured
        runs = []
        for _ in range(repeats):
            runs.append((timed(tokens) - timed(1)) * 1000 / (tokens - 1))
        return statistics.median(runs)
    finally:
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
