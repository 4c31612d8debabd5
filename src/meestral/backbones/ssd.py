"""Mamba-2's chunked scan (the state-space dual form) in plain torch, over HF's own modules.

HF's torch path for Mamba-2 (used when mamba-ssm is absent, as on the GPU box) materialises a
[batch, chunks, L, L, heads, state] product for the intra-chunk term: on a 40M-parameter model at
batch 32 x 512 tokens that is ~13 GB per layer, 117 GiB of peak memory and 5.5k tokens/s on an
H200 (measured 2026-12-01, recipes/mamba2-smol/probe.py). The same arithmetic written as batched
matrix products (C·Bᵀ per chunk, masked by the decay matrix, times X; chunk states as (X·decay)ᵀ·B;
one short recurrence over chunks) needs only [batch, chunks, heads, L, L] intermediates.

`mixer_forward` is one block's mixer on a whole sequence (from a zero state, or from an initial
SSM state with no conv history), `forward_logits` the whole model; both equal HF's forward (tests)
and are what distillation trains through. The weights stay HF's modules: nothing is re-declared.

On a GPU where mamba-ssm imports (benchmarks/build_mamba_ssm.sh builds it), the scan is its fused
Triton SSD kernels instead (`mamba_chunk_scan_combined`, forward and backward, with the D skip):
the same arithmetic without the [chunks, L, L] intermediates in memory, the biggest cost of a
distillation step on the torch scan. Only for blocks computing in half precision (a float32
model keeps the float32 torch scan); `FUSED_SCAN = False` keeps the torch scan everywhere.
Likewise the causal conv and its SiLU are causal-conv1d's kernel (`causal_conv1d_fn`, forward and
backward) where it imports: torch's depthwise Conv1d took 21 of a distillation step's 206 busy ms
on an H100 (forward, input gradient and weight gradient: benchmarks/NOTES.md, 2026-12-08);
`FUSED_CONV = False` keeps HF's Conv1d.
Where both import, a training pass (no padding mask, no initial state, no states kept) takes the
three in one call instead (`FUSED_MIXER`): mamba-ssm's `mamba_split_conv1d_scan_combined`, the path
its own Mamba2 trains through. It reads the conv input, dt, x, B and C straight from in_proj's
output in its own dtype (no float32 copies), folds the gated RMS norm into its kernels, and keeps
no conv output for backward (recomputed there). `FUSED_MIXER = False` keeps the two calls apart.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from meestral import switches

# on by default; MEESTRAL_FUSED_SCAN=0 (etc.) in the environment turns one off (meestral.switches)
FUSED_SCAN = switches.on("FUSED_SCAN")
FUSED_CONV = switches.on("FUSED_CONV")
FUSED_MIXER = switches.on("FUSED_MIXER")


@functools.cache
def _mamba_ssm_scan():
    """mamba-ssm's `mamba_chunk_scan_combined`, or None where it does not import (no mamba-ssm, or
    a build for another torch / GPU): the torch scan then runs."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or an extension built against another torch
        return None
    return mamba_chunk_scan_combined


def _fused_applies(switch, x, precision):
    """Whether a fused kernel serves this input: its switch on, a CUDA tensor (the only kind the
    kernels take), and a block computing in half precision (a bf16 model, or training under
    autocast: `precision` is the in_proj output's dtype). The kernels' float32 products round
    through TF32, coarser than a float32 model's torch path (exactness tests), which keeps its own."""
    return switch and x.is_cuda and precision != torch.float32


def _fused_scan_for(x, precision):
    """mamba-ssm's fused scan for this input, or None (`_fused_applies`)."""
    return _mamba_ssm_scan() if _fused_applies(FUSED_SCAN, x, precision) else None


@functools.cache
def _causal_conv1d():
    """causal-conv1d's `causal_conv1d_fn`, or None where it does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # ImportError, or an extension built against another torch
        return None
    return causal_conv1d_fn


def _fused_conv_for(m, x, precision):
    """causal-conv1d's conv + SiLU for mixer m on this input, or None (`_fused_applies`), for the
    SiLU mixers and window widths its kernels take."""
    if not (_fused_applies(FUSED_CONV, x, precision) and getattr(m, "activation", None) in ("silu", "swish")
            and 2 <= m.conv1d.kernel_size[0] <= 4):
        return None
    return _causal_conv1d()


@functools.cache
def _mamba_ssm_split_conv_scan():
    """mamba-ssm's `mamba_split_conv1d_scan_combined`, or None where it does not import (it needs
    causal-conv1d's kernels too)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
    except Exception:  # ImportError, or an extension built against another torch
        return None
    return mamba_split_conv1d_scan_combined


def _fused_mixer_for(m, x, precision):
    """mamba-ssm's conv + scan + gated norm in one call for mixer m on this input, or None: only
    where the fused conv and the fused scan would both serve it (it is their composition, so either
    switch off keeps it off too) and the mixer's gated norm normalises groups of intermediate /
    n_groups channels, the only grouping the combined kernels take (transformers before 5.24
    normalised over all channels, the same thing when n_groups is 1: `ssm.use_grouped_gated_norm`)."""
    if not (FUSED_MIXER and _fused_conv_for(m, x, precision) is not None and _fused_scan_for(x, precision) is not None):
        return None
    if getattr(m.norm, "group_size", m.intermediate_size) != m.intermediate_size // m.n_groups:
        return None
    return _mamba_ssm_split_conv_scan()


def conv_silu(m, xbc, precision):
    """SiLU(causal depthwise conv) of mixer m over xbc [b, l, conv_dim], as HF's torch path: its
    Conv1d (padding K - 1, the first l outputs) then its activation; or causal-conv1d's one kernel
    (float32 sums and SiLU of the same inputs, rounded once to xbc's dtype)."""
    fused = _fused_conv_for(m, xbc, precision)
    if fused is None:
        return m.act(m.conv1d(xbc.transpose(1, 2))[..., :xbc.shape[1]].transpose(1, 2))
    # channel-last (xbc's own layout, made contiguous: it is a slice of in_proj's output), the layout
    # mamba-ssm's Mamba2 hands the kernel; the weight [conv_dim, 1, K] as [conv_dim, K]
    out = fused(xbc.contiguous().transpose(1, 2), m.conv1d.weight[:, 0], m.conv1d.bias, activation="silu")
    return out.transpose(1, 2)


def ssd_scan(x, a, B, C, chunk: int, initial_state=None):
    """y_t = C_t · S_t with S_t = exp(a_t) S_{t-1} + x_t ⊗ B_t, for every head.

    x [b, l, h, p] (input already scaled by dt), a [b, l, h] (A·dt, <= 0), B and C [b, l, g, n]
    (g groups shared by h/g heads each), initial_state [b, h, p, n] or None (zeros).
    Returns (y [b, l, h, p], final state [b, h, p, n]), all float32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    # A sequence shorter than a chunk is one chunk of its own length: the same products without the
    # padding (equal to the padded scan; prompts and scored requests are mostly shorter than 128
    # tokens, and the intra-chunk work grows with the chunk's square).
    chunk = max(1, min(chunk, l))
    pad = (-l) % chunk
    if pad:  # a = 0 and x = 0 past the end: no decay, no input, so the final state is unchanged
        x, a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, B, C))
    c = x.shape[1] // chunk
    r = h // g  # heads per group: B and C are shared by the r heads of a group
    x = x.reshape(b, c, chunk, h, p)
    Bg = B.reshape(b, c, chunk, g, n).permute(0, 1, 3, 2, 4)  # [b, c, g, L, n]
    Cg = C.reshape(b, c, chunk, g, n).permute(0, 1, 3, 2, 4)
    acs = a.reshape(b, c, chunk, h).permute(0, 1, 3, 2).cumsum(-1)  # [b, c, h, L]

    # Intra-chunk: y_t += sum_{s<=t} (C_t·B_s) exp(acs_t - acs_s) x_s. C·Bᵀ is one product per group,
    # not per head (Mamba-2 models have few groups: mamba2-smol 1 for 12 heads).
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    seg = (acs[..., :, None] - acs[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [b,c,h,L,L]
    cb = Cg @ Bg.transpose(-1, -2)  # [b, c, g, L(t), L(s)]
    w = (seg.view(b, c, g, r, chunk, chunk) * cb[:, :, :, None]).view(b, c, h, chunk, chunk)
    xh = x.permute(0, 1, 3, 2, 4)  # [b, c, h, L, p]
    y = w @ xh  # [b, c, h, L, p]

    # Each chunk's own contribution to the state at its end: sum_s exp(acs_end - acs_s) x_s ⊗ B_s,
    # the r heads of a group stacked into one product with the group's B.
    decay_to_end = (acs[..., -1:] - acs).exp()  # [b, c, h, L]
    xd = (xh * decay_to_end[..., None]).transpose(-1, -2).reshape(b, c, g, r * p, chunk)
    own = (xd @ Bg).view(b, c, h, p, n)

    # The state entering each chunk: a short recurrence over chunks.
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float()
    chunk_decay = acs[..., -1].exp()  # [b, c, h]
    entering = []
    for k in range(c):
        entering.append(state)
        state = state * chunk_decay[:, k, :, None, None] + own[:, k]
    entering = torch.stack(entering, 1)  # [b, c, h, p, n]

    # Inter-chunk: y_t += exp(acs_t) C_t · S_entering, again one product per group: C [L, n] times
    # the group's states side by side [n, r * p].
    st = entering.view(b, c, g, r * p, n).transpose(-1, -2)  # [b, c, g, n, r*p]
    inter = (Cg @ st).view(b, c, g, chunk, r, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, chunk, p)
    y = y + inter * acs.exp()[..., None]
    y = y.permute(0, 1, 3, 2, 4).reshape(b, c * chunk, h, p)[:, :l]
    return y, state


def mixer_forward(m, u, initial_state=None, mask=None, states=False):
    """HF `Mamba2Mixer` m on normed input u [b, l, d], as its torch path computes it (no cache).
    `mask` [b, l] (1 = token, 0 = padding) zeroes padded positions where HF does. With `states`,
    also returns what a decoder keeps after the sequence: (output, conv window [b, conv_dim, K] of
    the last K conv inputs, padding as zeros, final SSM state [b, h, p, n] float32)."""
    b, l, _ = u.shape
    if mask is not None:
        u = (u * mask[:, :, None]).to(u.dtype)
    I, cd, H, n, g = m.intermediate_size, m.conv_dim, m.num_heads, m.ssm_state_size, m.n_groups
    proj = m.in_proj(u)
    d_mlp = (proj.shape[-1] - 2 * I - 2 * g * n - H) // 2
    mixer = _fused_mixer_for(m, proj, proj.dtype) if (mask is None and initial_state is None and not states
                                                      and d_mlp == 0) else None
    if mixer is not None:
        # in_proj's output as mamba-ssm splits it ([z | x B C | dt], the layout HF's in_proj shares);
        # dt's softplus, bias and limits and the D skip happen inside, as below; HF's norm is
        # y * silu(gate) first, then the norm (norm_before_gate=False). out_proj stays HF's module,
        # so whatever wraps it (LoRA hooks, autocast) applies as on the other path.
        y = mixer(proj, m.conv1d.weight[:, 0], m.conv1d.bias, m.dt_bias, -torch.exp(m.A_log.float()), m.D,
                  m.chunk_size, dt_limit=tuple(m.time_step_limit), activation="silu", rmsnorm_weight=m.norm.weight,
                  rmsnorm_eps=m.norm.variance_epsilon, headdim=m.head_dim, ngroups=g, norm_before_gate=False)
        return m.out_proj(y)
    _, _, gate, xbc, dt = proj.split([d_mlp, d_mlp, I, cd, H], dim=-1)
    if states:
        K = m.conv1d.kernel_size[0]
        raw = xbc if mask is None else xbc * mask[:, :, None].to(xbc.dtype)
        window = F.pad(raw.transpose(1, 2), (max(0, K - l), 0))[..., -K:]
    xbc = conv_silu(m, xbc, proj.dtype)
    if mask is not None:
        xbc = (xbc * mask[:, :, None]).to(xbc.dtype)
    x, Bm, Cm = xbc.split([I, g * n, g * n], dim=-1)
    dt = F.softplus(dt.float() + m.dt_bias.float())
    dt = dt.clamp(min=m.time_step_limit[0], max=m.time_step_limit[1])
    A = -torch.exp(m.A_log.float())
    x = x.float().reshape(b, l, H, m.head_dim)
    Bm, Cm = Bm.float().reshape(b, l, g, n), Cm.float().reshape(b, l, g, n)
    fused = _fused_scan_for(x, proj.dtype)
    if fused is not None:
        # the same scan in mamba-ssm's terms: it scales x by dt and A by dt itself, adds D x
        y, state = fused(x, dt, A, Bm, Cm, m.chunk_size, D=m.D.float(),
                         initial_states=None if initial_state is None else initial_state.float(),
                         return_final_states=True)
    else:
        y, state = ssd_scan(x * dt[..., None], A * dt, Bm, Cm, m.chunk_size, initial_state)
        y = y + m.D.float()[None, None, :, None] * x
    y = m.norm(y.reshape(b, l, I).to(u.dtype), gate)
    out = m.out_proj(y.to(u.dtype))
    return (out, window, state) if states else out


def forward_collect(model, input_ids, layers=(), mask=None, aux=False, skip=None):
    """One pass of an HF Mamba2ForCausalLM: ({layer: residual stream after block layer},
    {layer: that block's mixer output} if aux, final-normed hidden states [b, l, d]).
    `skip` [L, b] bool: rows for which block i adds nothing (layer dropout in adaptation)."""
    bb = model.backbone
    want = set(layers)
    h = bb.embeddings(input_ids)
    fp32 = bool(getattr(model.config, "residual_in_fp32", False))
    hidden, auxes = {}, {}
    for i, block in enumerate(bb.layers):
        residual = h.float() if fp32 else h
        mixed = mixer_forward(block.mixer, block.norm(h.to(block.norm.weight.dtype)), mask=mask)
        h = residual + mixed
        if skip is not None:
            h = torch.where(skip[i].to(h.device)[:, None, None], residual, h)
        if i in want:
            hidden[i] = h
            if aux:
                auxes[i] = mixed
    return hidden, auxes, bb.norm_f(h.to(bb.norm_f.weight.dtype))


def forward_logits(model, input_ids):
    """Logits [b, l, V] of an HF Mamba2ForCausalLM, equal to `model(input_ids).logits`."""
    h = forward_collect(model, input_ids)[2]
    return model.lm_head(h.to(model.lm_head.weight.dtype))
