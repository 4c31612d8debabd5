"""The Triton source of the Mamba-2 decode step (mamba2_step.py says what it computes and why it is
two kernels). Apart from the op so that Triton is imported only where the step runs on a GPU or
under Triton's CPU interpreter (tests), and so that Triton's jit, which compiles each kernel from
this file's source and resolves the helpers it calls in this module's globals, finds them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _window(proj_ptr, cs_ptr, b, ch, cm, stride_p, xoff, cs_sb, K: tl.constexpr, KP: tl.constexpr):
    """The conv window of channels ch (mask cm) of row b after this token: the stored one moved
    on by one, the new input last ([channels, KP], the conv state's dtype)."""
    k = tl.arange(0, KP)
    old = tl.load(cs_ptr + b * cs_sb + ch[:, None] * K + k[None, :] + 1,
                  mask=cm[:, None] & (k[None, :] < K - 1), other=0.0)
    new = tl.load(proj_ptr + b * stride_p + xoff + ch, mask=cm, other=0.0).to(old.dtype)
    return tl.where(k[None, :] == K - 1, new[:, None], old)


@triton.jit
def _conv(proj_ptr, cs_ptr, cw_ptr, cb_ptr, b, ch, cm, stride_p, xoff, cs_sb, K: tl.constexpr,
          KP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The causal conv at channels ch of row b: its new window and SiLU(conv + bias), rounded
    as the torch code rounds."""
    dt = proj_ptr.dtype.element_ty
    k = tl.arange(0, KP)
    win = _window(proj_ptr, cs_ptr, b, ch, cm, stride_p, xoff, cs_sb, K, KP)
    w = tl.load(cw_ptr + ch[:, None] * K + k[None, :], mask=cm[:, None] & (k[None, :] < K), other=0.0)
    prod = (win.to(tl.float32) * w.to(tl.float32)).to(win.dtype).to(tl.float32)
    c = tl.sum(prod, axis=1).to(win.dtype).to(tl.float32)
    if HAS_BIAS:
        c = (c + tl.load(cb_ptr + ch, mask=cm, other=0.0).to(tl.float32)).to(win.dtype).to(tl.float32)
    return win, (c * tl.sigmoid(c)).to(dt).to(tl.float32)


@triton.jit
def _scan(proj_ptr, cs_ptr, ss_ptr, wr_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr, d_ptr, y_ptr,
          stride_p, xoff, I, H, P, N, G, dt_min, dt_max, K: tl.constexpr, KP: tl.constexpr,
          HAS_BIAS: tl.constexpr, OUTPUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // (H // G)
    conv_dim = I + 2 * G * N
    cs_sb = conv_dim * K
    write = tl.load(wr_ptr + b) != 0
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    xwin, x = _conv(proj_ptr, cs_ptr, cw_ptr, cb_ptr, b, h * P + p, pm, stride_p, xoff, cs_sb, K, KP, HAS_BIAS)
    _, Bv = _conv(proj_ptr, cs_ptr, cw_ptr, cb_ptr, b, I + g * N + n, nm, stride_p, xoff, cs_sb, K, KP, HAS_BIAS)
    _, Cv = _conv(proj_ptr, cs_ptr, cw_ptr, cb_ptr, b, I + G * N + g * N + n, nm, stride_p, xoff, cs_sb, K, KP,
                  HAS_BIAS)
    k = tl.arange(0, KP)
    # this program's x channels belong to it alone: their window can be written now
    tl.store(cs_ptr + b * cs_sb + (h * P + p)[:, None] * K + k[None, :], xwin,
             mask=write & pm[:, None] & (k[None, :] < K))
    # softplus (torch's threshold 20), clamped to the time-step limits as HF's scan does
    v = tl.load(proj_ptr + b * stride_p + xoff + conv_dim + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    e = tl.exp(v)
    sp = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))  # log1p(e) without cancellation
    d = tl.minimum(tl.maximum(tl.where(v > 20.0, v, sp), dt_min), dt_max)
    dA = tl.exp(d * -tl.exp(tl.load(alog_ptr + h).to(tl.float32)))
    at = ss_ptr + ((b * H + h) * P + p[:, None]) * N + n[None, :]
    m2 = pm[:, None] & nm[None, :]
    s = tl.load(at, mask=m2, other=0.0)
    new = s * dA + (d * x)[:, None] * Bv[None, :]
    tl.store(at, new, mask=m2 & write)
    if OUTPUT:
        y = tl.sum(new * Cv[None, :], axis=1) + tl.load(d_ptr + h).to(tl.float32) * x
        tl.store(y_ptr + b * I + h * P + p, y.to(y_ptr.dtype.element_ty), mask=pm)


@triton.jit
def _shift(proj_ptr, cs_ptr, b, ch, cm, stride_p, xoff, cs_sb, write, K: tl.constexpr, KP: tl.constexpr):
    """Stores the new conv window of channels ch of row b (rows not written keep theirs)."""
    k = tl.arange(0, KP)
    win = _window(proj_ptr, cs_ptr, b, ch, cm, stride_p, xoff, cs_sb, K, KP)
    tl.store(cs_ptr + b * cs_sb + ch[:, None] * K + k[None, :], win, mask=write & cm[:, None] & (k[None, :] < K))


@triton.jit
def _gate_norm(proj_ptr, cs_ptr, wr_ptr, y_ptr, gw_ptr, out_ptr, stride_p, xoff, I, N, G, GS, eps,
               K: tl.constexpr, KP: tl.constexpr, OUTPUT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_GS: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    conv_dim = I + 2 * G * N
    cs_sb = conv_dim * K
    write = tl.load(wr_ptr + b) != 0
    n = tl.arange(0, BLOCK_N)
    if g < G:  # the group's B and C channels: their windows, now that kernel 1 has read them
        _shift(proj_ptr, cs_ptr, b, I + g * N + n, n < N, stride_p, xoff, cs_sb, write, K, KP)
        _shift(proj_ptr, cs_ptr, b, I + G * N + g * N + n, n < N, stride_p, xoff, cs_sb, write, K, KP)
    if OUTPUT:
        if g < I // GS:  # MambaRMSNormGated: gate in float32, an RMS norm per group of GS channels
            dt = out_ptr.dtype.element_ty
            c = g * GS + tl.arange(0, BLOCK_GS)
            cm = c < g * GS + GS
            y = tl.load(y_ptr + b * I + c, mask=cm, other=0.0).to(tl.float32)
            z = tl.load(proj_ptr + b * stride_p + c, mask=cm, other=0.0).to(tl.float32)
            yf = y * (z * tl.sigmoid(z))
            r = 1.0 / tl.sqrt(tl.sum(yf * yf, axis=0) / GS + eps)
            o = tl.load(gw_ptr + c, mask=cm, other=0.0).to(tl.float32) * (yf * r).to(dt).to(tl.float32)
            tl.store(out_ptr + b * I + c, o.to(dt), mask=cm)


def launch(proj, conv_state, ssm_state, write, conv_w, conv_b, dt_bias, A_log, D, gnorm_w, *, n_heads,
           head_dim, n_groups, state_size, intermediate, group_size, gnorm_eps, dt_min, dt_max):
    Bsz = proj.shape[0]
    I, H, P, N, G = intermediate, n_heads, head_dim, state_size, n_groups
    K = conv_state.shape[-1]
    output = gnorm_w is not None
    xoff = I if output else 0
    KP = triton.next_power_of_2(K)
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_P = min(16, triton.next_power_of_2(P))
    y = torch.empty(Bsz, I, dtype=proj.dtype, device=proj.device) if output else proj
    wr = write  # bool: the kernels read it as int1
    cb = conv_w if conv_b is None else conv_b
    _scan[(Bsz, H, triton.cdiv(P, BLOCK_P))](
        proj, conv_state, ssm_state, wr, conv_w, cb, dt_bias, A_log, D, y, proj.stride(0), xoff, I, H, P, N, G,
        float(dt_min), float(dt_max), K=K, KP=KP, HAS_BIAS=conv_b is not None, OUTPUT=output, BLOCK_P=BLOCK_P,
        BLOCK_N=BLOCK_N, num_warps=4)
    out = torch.empty_like(y) if output else None
    gs = group_size if output else I
    _gate_norm[(Bsz, max(G, I // gs))](
        proj, conv_state, wr, y, gnorm_w if output else proj, out if output else proj, proj.stride(0), xoff, I, N,
        G, gs, float(gnorm_eps), K=K, KP=KP, OUTPUT=output, BLOCK_N=BLOCK_N,
        BLOCK_GS=triton.next_power_of_2(gs), num_warps=4 if gs <= 1024 else 8)
    return out

