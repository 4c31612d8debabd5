"""The Triton source of the Mamba-2 step (mamba2_step.py says what it computes and why it is two
kernels). Apart from the op so that Triton is imported only where the step runs on a GPU or under
Triton's CPU interpreter (tests), and so that Triton's jit, which compiles each kernel from this
file's source and resolves the helpers it calls in this module's globals, finds them.

Both kernels take a window of T tokens: the causal conv's four taps and the SSM state stay in
registers from one token to the next, so the state is read and written once per window, not once
per token (catch-up's deep pass, verify windows, speculate cycles)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meestral.backbones import pdl

TAPS = 4  # the conv window the kernels hold in registers (every Mamba-2 release uses d_conv = 4)


@triton.jit
def _taps(cs_ptr, b, ch, cm, cs_sb):
    """The stored conv window [c0, c1, c2, c3] of channels ch (mask cm) of row b."""
    at = cs_ptr + b * cs_sb + ch * 4
    return (tl.load(at, mask=cm, other=0.0), tl.load(at + 1, mask=cm, other=0.0),
            tl.load(at + 2, mask=cm, other=0.0), tl.load(at + 3, mask=cm, other=0.0))


@triton.jit
def _conv(c1, c2, c3, new, w_ptr, cb_ptr, ch, cm, HAS_BIAS: tl.constexpr):
    """SiLU(conv + bias) over the window [c1, c2, c3, new], rounded where the torch code rounds:
    each product in the window's dtype, their sum, the bias add, the SiLU."""
    wd = c1.dtype
    f = tl.float32
    at = w_ptr + ch * 4
    p0 = (c1.to(f) * tl.load(at, mask=cm, other=0.0).to(f)).to(wd).to(f)
    p1 = (c2.to(f) * tl.load(at + 1, mask=cm, other=0.0).to(f)).to(wd).to(f)
    p2 = (c3.to(f) * tl.load(at + 2, mask=cm, other=0.0).to(f)).to(wd).to(f)
    p3 = (new.to(f) * tl.load(at + 3, mask=cm, other=0.0).to(f)).to(wd).to(f)
    c = (p0 + p1 + p2 + p3).to(wd).to(f)
    if HAS_BIAS:
        c = (c + tl.load(cb_ptr + ch, mask=cm, other=0.0).to(f)).to(wd).to(f)
    return (c * tl.sigmoid(c)).to(wd).to(f)


@triton.jit
def _scan(proj_ptr, cs_ptr, ss_ptr, wr_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr, d_ptr, y_ptr,
          stride_b, stride_t, xoff, T, I, H, P, N, G, dt_min, dt_max, HAS_BIAS: tl.constexpr,
          OUTPUT: tl.constexpr, PDL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # program (row b, head h, block of the head's channels)
    b = tl.program_id(0)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // (H // G)
    conv_dim = I + 2 * G * N
    cs_sb = conv_dim * 4
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    xc, bc, cc = h * P + p, I + g * N + n, I + G * N + g * N + n
    x0, x1, x2, x3 = _taps(cs_ptr, b, xc, pm, cs_sb)
    b0, b1, b2, b3 = _taps(cs_ptr, b, bc, nm, cs_sb)
    q0, q1, q2, q3 = _taps(cs_ptr, b, cc, nm, cs_sb)
    at = ss_ptr + ((b * H + h) * P + p[:, None]) * N + n[None, :]
    m2 = pm[:, None] & nm[None, :]
    s = tl.load(at, mask=m2, other=0.0).to(tl.float32)  # a float32 state, or one in the model's dtype
    sdt = ss_ptr.dtype.element_ty
    A = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
    Dh = tl.load(d_ptr + h).to(tl.float32)
    dtb = tl.load(dtb_ptr + h).to(tl.float32)
    # Launched while the previous kernel runs (pdl.py): the state and the conv windows above are read
    # before the wait, the rest after it. Safe because the kernel before this one is always in_proj's
    # matmul, which writes neither and launches its dependents only after its own wait, that is once
    # every kernel before it (the last writers of the state: this block's previous step, a
    # rollback's copies) has completed.
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for t in range(T):
        write = tl.load(wr_ptr + b * T + t) != 0
        row = proj_ptr + b * stride_b + t * stride_t + xoff
        xn = tl.load(row + xc, mask=pm, other=0.0).to(x0.dtype)
        bn = tl.load(row + bc, mask=nm, other=0.0).to(x0.dtype)
        qn = tl.load(row + cc, mask=nm, other=0.0).to(x0.dtype)
        x = _conv(x1, x2, x3, xn, cw_ptr, cb_ptr, xc, pm, HAS_BIAS)
        Bv = _conv(b1, b2, b3, bn, cw_ptr, cb_ptr, bc, nm, HAS_BIAS)
        Cv = _conv(q1, q2, q3, qn, cw_ptr, cb_ptr, cc, nm, HAS_BIAS)
        # softplus (torch's threshold 20), clamped to the time-step limits as HF's scan does
        v = tl.load(row + conv_dim + h).to(tl.float32) + dtb
        e = tl.exp(v)
        sp = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))  # log1p(e) without cancellation
        d = tl.minimum(tl.maximum(tl.where(v > 20.0, v, sp), dt_min), dt_max)
        new = s * tl.exp(d * A) + (d * x)[:, None] * Bv[None, :]
        if OUTPUT:
            y = tl.sum(new * Cv[None, :], axis=1) + Dh * x
            tl.store(y_ptr + (b * T + t) * I + xc, y.to(y_ptr.dtype.element_ty), mask=pm)
        # a (row, token) not written leaves the state and the window as they were; a written one
        # rounds the state to its stored dtype after every token, as a one-token step stores it
        s = tl.where(write, new.to(sdt).to(tl.float32), s)
        x0, x1, x2, x3 = tl.where(write, x1, x0), tl.where(write, x2, x1), tl.where(write, x3, x2), tl.where(write, xn, x3)
        b0, b1, b2, b3 = tl.where(write, b1, b0), tl.where(write, b2, b1), tl.where(write, b3, b2), tl.where(write, bn, b3)
        q0, q1, q2, q3 = tl.where(write, q1, q0), tl.where(write, q2, q1), tl.where(write, q3, q2), tl.where(write, qn, q3)
    tl.store(at, s.to(sdt), mask=m2)
    # this program's x channels belong to it alone: their window can be written now (the group's B
    # and C windows are read by every head of the group: kernel 2 writes them)
    base = cs_ptr + b * cs_sb + xc * 4
    tl.store(base, x0, mask=pm)
    tl.store(base + 1, x1, mask=pm)
    tl.store(base + 2, x2, mask=pm)
    tl.store(base + 3, x3, mask=pm)


@triton.jit
def _shift(proj_ptr, cs_ptr, wr_ptr, b, ch, cm, stride_b, stride_t, xoff, cs_sb, T):
    """Stores the conv window of channels ch of row b after the window's written tokens."""
    c0, c1, c2, c3 = _taps(cs_ptr, b, ch, cm, cs_sb)
    for t in range(T):
        write = tl.load(wr_ptr + b * T + t) != 0
        new = tl.load(proj_ptr + b * stride_b + t * stride_t + xoff + ch, mask=cm, other=0.0).to(c0.dtype)
        c0, c1, c2, c3 = tl.where(write, c1, c0), tl.where(write, c2, c1), tl.where(write, c3, c2), tl.where(write, new, c3)
    at = cs_ptr + b * cs_sb + ch * 4
    tl.store(at, c0, mask=cm)
    tl.store(at + 1, c1, mask=cm)
    tl.store(at + 2, c2, mask=cm)
    tl.store(at + 3, c3, mask=cm)


@triton.jit
def _gate_norm(proj_ptr, cs_ptr, wr_ptr, y_ptr, gw_ptr, out_ptr, stride_b, stride_t, xoff, T, I, N, G, GS, eps,
               OUTPUT: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_GS: tl.constexpr):
    # program (row b, group g)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    g = tl.program_id(1)
    cs_sb = (I + 2 * G * N) * 4
    n = tl.arange(0, BLOCK_N)
    if g < G:  # the group's B and C channels: their windows, now that kernel 1 has read them
        _shift(proj_ptr, cs_ptr, wr_ptr, b, I + g * N + n, n < N, stride_b, stride_t, xoff, cs_sb, T)
        _shift(proj_ptr, cs_ptr, wr_ptr, b, I + G * N + g * N + n, n < N, stride_b, stride_t, xoff, cs_sb, T)
    if OUTPUT:
        if g < I // GS:  # MambaRMSNormGated: gate in float32, an RMS norm per group of GS channels
            dt = out_ptr.dtype.element_ty
            c = g * GS + tl.arange(0, BLOCK_GS)
            cm = c < g * GS + GS
            w = tl.load(gw_ptr + c, mask=cm, other=0.0).to(tl.float32)
            for t in range(T):
                y = tl.load(y_ptr + (b * T + t) * I + c, mask=cm, other=0.0).to(tl.float32)
                z = tl.load(proj_ptr + b * stride_b + t * stride_t + c, mask=cm, other=0.0).to(tl.float32)
                yf = y * (z * tl.sigmoid(z))
                r = 1.0 / tl.sqrt(tl.sum(yf * yf, axis=0) / GS + eps)
                o = w * (yf * r).to(dt).to(tl.float32)
                tl.store(out_ptr + (b * T + t) * I + c, o.to(dt), mask=cm)


def launch(proj, conv_state, ssm_state, write, conv_w, conv_b, dt_bias, A_log, D, gnorm_w, *, n_heads,
           head_dim, n_groups, state_size, intermediate, group_size, gnorm_eps, dt_min, dt_max):
    """proj [B, T, Dp] (last dim contiguous), write [B, T] bool (contiguous): see mamba2_step.kernels."""
    Bsz, T = proj.shape[:2]
    I, H, P, N, G = intermediate, n_heads, head_dim, state_size, n_groups
    assert conv_state.shape[-1] == TAPS and proj.stride(-1) == 1 and write.is_contiguous()
    output = gnorm_w is not None
    xoff = I if output else 0
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_P = min(16, triton.next_power_of_2(P))
    y = torch.empty(Bsz, T, I, dtype=proj.dtype, device=proj.device) if output else proj
    cb = conv_w if conv_b is None else conv_b
    strides = (proj.stride(0), proj.stride(1))
    kw = pdl.launch_kw(proj)
    _scan[(Bsz, H, triton.cdiv(P, BLOCK_P))](
        proj, conv_state, ssm_state, write, conv_w, cb, dt_bias, A_log, D, y, *strides, xoff, T, I, H, P, N, G,
        float(dt_min), float(dt_max), HAS_BIAS=conv_b is not None, OUTPUT=output, BLOCK_P=BLOCK_P,
        BLOCK_N=BLOCK_N, num_warps=4, **kw)
    out = torch.empty_like(y) if output else None
    gs = group_size if output else I
    _gate_norm[(Bsz, max(G, I // gs))](
        proj, conv_state, write, y, gnorm_w if output else proj, out if output else proj, *strides, xoff, T, I, N,
        G, gs, float(gnorm_eps), OUTPUT=output, BLOCK_N=BLOCK_N, BLOCK_GS=triton.next_power_of_2(gs),
        num_warps=4 if gs <= 1024 else 8, **kw)
    return out
