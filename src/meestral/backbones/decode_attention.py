"""One token's grouped attention over the K/V cache as one Triton kernel (Mistral / Llama decode).

At batch 1 a decode step's attention moves little (K and V of the keys so far, a few hundred KB a
layer at short contexts), yet as torch code it is seven kernels a layer once inductor has fused
what it can: rotary, the K/V write into the slot buffers, the mask, QK^T, the float32 softmax, PV
and a transpose before o_proj. Between graph launches that cost is per kernel, not per byte. Here
it is one kernel, one program per (row, query head):

- q and k rotated from the qkv projection's output (cos / sin of the step's position);
- the new K and V written at the step's slot by the first query head of each K/V head (rows whose
  `write` is False keep the slot's old K/V, as the torch code does); every program of the group
  uses the new K/V from its own registers at that slot, so no program reads a slot another is
  writing;
- scores over the keys up to the slot (the sliding window's start, if any), masked by the layer's
  validity before the write, the own slot always seen (as `transformer._attend` builds its mask);
  softmax in float32 online over blocks of keys (flash-decoding without the split);
- the output in the layout o_proj reads ([B, heads * head_dim]).

Roundings follow the compiled torch code where it has them (the rotated K/V and the scores in the
model's dtype); the probabilities stay float32 until PV (the torch code rounds them first): within
the dtype's rounding of `_attend` (tests: under Triton's CPU interpreter, and on CUDA). One token a
call; windows (catch-up, verify), float32 and the CPU take the torch code.
"""

from __future__ import annotations

import torch

ENABLED = True  # the bench switches it off to time the torch code's kernels in the same run
MAX_KEYS = 2048  # one program walks all keys of its head: for longer caches a split over keys would pay


def kernels():
    """The launcher, or None without Triton (apart from the op so tests can run it under Triton's
    CPU interpreter).

    launch(qkv [B, (H + 2 Hkv) D], cos, sin [B, D], kbuf, vbuf [B, Hkv, capacity, D], valid [B, capacity],
    slot [1] long, write [B] bool, scaling, n_heads, window) -> o [B, H D]; kbuf / vbuf / valid change
    in place at the slot."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _attend(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, wr_ptr, o_ptr, scaling, H, HKV,
                cap, window, D: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        G = H // HKV
        kvh = h // G
        half: tl.constexpr = D // 2
        dt = o_ptr.dtype.element_ty
        slot = tl.load(slot_ptr)
        write = tl.load(wr_ptr + b) != 0
        d = tl.arange(0, D)
        rot = tl.where(d < half, d + half, d - half)  # rotate_half: (-x2, x1)
        sign = tl.where(d < half, -1.0, 1.0)
        row = qkv_ptr + b * (H + 2 * HKV) * D
        cos = tl.load(cos_ptr + b * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * D + d).to(tl.float32)
        q = tl.load(row + h * D + d).to(tl.float32)
        q = (q * cos + sign * tl.load(row + h * D + rot).to(tl.float32) * sin).to(dt).to(tl.float32)
        kn = tl.load(row + (H + kvh) * D + d).to(tl.float32)
        kn = (kn * cos + sign * tl.load(row + (H + kvh) * D + rot).to(tl.float32) * sin).to(dt)
        vn = tl.load(row + (H + HKV + kvh) * D + d).to(dt)
        base = (b * HKV + kvh) * cap * D
        if h % G == 0:  # one program per K/V head writes the slot
            tl.store(k_ptr + base + slot * D + d, kn, mask=write & (d < D))
            tl.store(v_ptr + base + slot * D + d, vn, mask=write & (d < D))
            if h == 0:
                old = tl.load(valid_ptr + b * cap + slot)
                tl.store(valid_ptr + b * cap + slot, (old != 0) | write)
        lo = tl.where(window > 0, tl.maximum(slot - window + 1, 0), 0)
        lo = (lo // BLOCK) * BLOCK
        m = tl.max(tl.full((BLOCK,), -float("inf"), tl.float32), axis=0)
        l = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
        acc = tl.zeros((D,), tl.float32)
        for start in range(lo, slot + 1, BLOCK):
            key = start + tl.arange(0, BLOCK)
            inside = key <= slot
            kb = tl.load(k_ptr + base + key[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
            vb = tl.load(v_ptr + base + key[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
            own = key == slot
            new = own & write
            kb = tl.where(new[:, None], kn[None, :], kb).to(tl.float32)
            vb = tl.where(new[:, None], vn[None, :], vb).to(tl.float32)
            s = tl.sum(kb * q[None, :], axis=1).to(dt).to(tl.float32)
            s = (s * scaling).to(dt).to(tl.float32)
            seen = tl.load(valid_ptr + b * cap + key, mask=inside & ~own, other=0) != 0
            seen = seen & ((window <= 0) | (key > slot - window))
            s = tl.where(seen | own, s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)  # a block with no key seen yet
            p = tl.exp(s - m_sub)
            scale = tl.exp(m - m_sub)
            l = l * scale + tl.sum(p, axis=0)
            acc = acc * scale + tl.sum(p[:, None] * vb, axis=0)
            m = m_new
        tl.store(o_ptr + (b * H + h) * D + d, (acc / l).to(dt))

    def launch(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window):
        B, HKV, cap, D = kbuf.shape
        o = torch.empty(B, n_heads * D, dtype=qkv.dtype, device=qkv.device)
        _attend[(B, n_heads)](qkv, cos, sin, kbuf, vbuf, valid, slot, write, o, float(scaling), n_heads, HKV, cap,
                              int(window or 0), D=D, BLOCK=32 if D > 64 else 64, num_warps=4)
        return o

    return launch


def _make_op():
    launch = kernels()
    if launch is None:
        return False

    @torch.library.custom_op("meestral::decode_attention", mutates_args=("kbuf", "vbuf", "valid"))
    def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kbuf: torch.Tensor,
                         vbuf: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor, write: torch.Tensor,
                         scaling: float, n_heads: int, window: int) -> torch.Tensor:
        return launch(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window)

    @decode_attention.register_fake
    def _(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window):
        return qkv.new_empty(qkv.shape[0], n_heads * kbuf.shape[-1])

    return decode_attention


# Made at import, as backbones/gemv.py's op (a registration inside a traced function breaks its graph).
_OP = _make_op() if torch.cuda.is_available() else False
_HAVE_OP = _OP is not False


def applies(qkv: torch.Tensor, kbuf: torch.Tensor) -> bool:
    """Whether the kernel takes this step's attention: one token, CUDA, bf16 / fp16, contiguous
    buffers, a power-of-two head_dim, no gradients, a cache it can walk in one program per head."""
    D = kbuf.shape[-1]
    return (_HAVE_OP and ENABLED and qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16)
            and kbuf.dtype == qkv.dtype and kbuf.is_contiguous() and D & (D - 1) == 0 and D >= 16
            and kbuf.shape[2] <= MAX_KEYS and not qkv.requires_grad)


def attend(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window):
    """The kernel's attention (see `kernels`); only where `applies` says so."""
    return _OP(qkv.contiguous(), cos.contiguous(), sin.contiguous(), kbuf, vbuf, valid, slot, write.contiguous(),
               float(scaling), n_heads, int(window or 0))
