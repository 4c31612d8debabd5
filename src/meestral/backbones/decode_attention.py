"""One token's grouped attention over the K/V cache in two Triton kernels (Mistral / Llama decode).

At batch 1 a decode step's attention moves little (K and V of the keys so far, a few hundred KB a
layer at short contexts), yet as torch code it is seven kernels a layer once inductor has fused
what it can: rotary, the K/V write into the slot buffers, the mask, QK^T, the float32 softmax, PV
and a transpose before o_proj. Between graph launches that cost is per kernel, not per byte. Here
it is two kernels (flash-decoding): one program per (row, query head, chunk of 64 keys) makes its
part of the softmax, a second kernel per (row, query head) rescales and sums the parts. (One
program per head walking all keys was latency-bound: 18 us a layer at 256 keys on an H100.)

- q and k rotated from the qkv projection's output (cos / sin of the step's position);
- the new K and V written at the step's slot by the first query head of each K/V head (rows whose
  `write` is False keep the slot's old K/V, as the torch code does); every program of the group
  uses the new K/V from its own registers at that slot, so no program reads a slot another is
  writing;
- scores over the keys up to the slot (the sliding window's start, if any), masked by the layer's
  validity before the write, the own slot always seen (as `transformer._attend` builds its mask);
  softmax in float32, each chunk's part (its maximum, sum and weighted V) combined by the second;
- the output in the layout o_proj reads ([B, heads * head_dim]).

Roundings follow the compiled torch code where it has them (the rotated K/V and the scores in the
model's dtype); the probabilities stay float32 until PV (the torch code rounds them first): within
the dtype's rounding of `_attend` (tests: under Triton's CPU interpreter, and on CUDA).

Windows of several positions (catch-up's deep passes, verify, speculate cycles) take a third
kernel for the products and softmax (`attend_window`): per (row, K/V head, chunk of keys) the G
query heads x T positions as one tile, so each K/V chunk is read once and QK^T and PV run on the
tensor cores; rotary, the K/V write and the mask stay the torch code's (inductor fuses them), and
the parts combine as one token's do. Float32 and the CPU take the torch code.
"""

from __future__ import annotations

import torch

from meestral.backbones import pdl

ENABLED = True  # the bench switches it off to time the torch code's kernels in the same run
# The combination of one token's parts done by each head's last program inside the first kernel
# (an atomic counter a head), not by a second kernel: one kernel a layer fewer. Equal to the two
# kernels on an H100 (cuda tests) but no faster there at a 128-token prompt (188.0 tok/s both ways,
# benchmarks/NOTES.md 2026-12-07, sixth session, dependent launches already hiding the launch): off.
FOLD = False
WINDOW = True  # the window kernel (several positions); the bench's `..._compiled_window_attention` row times it off
MAX_KEYS = 1 << 15  # the parts of one head: [capacity / 64, head_dim] float32 a row and query head


try:  # a module-level helper: the jit and Triton's interpreter resolve it from the kernels' globals
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_parts(ml_ptr, acc_ptr, o_ptr, bh, S, D: tl.constexpr, SP: tl.constexpr):
        # the S chunks' parts of one (row, query head) rescaled to their common maximum
        c = tl.arange(0, SP)
        d = tl.arange(0, D)
        part = bh * S + c
        m = tl.load(ml_ptr + part * 2, mask=c < S, other=-float("inf"), cache_modifier=".cg")
        l = tl.load(ml_ptr + part * 2 + 1, mask=c < S, other=0.0, cache_modifier=".cg")
        top = tl.max(m, axis=0)
        w = tl.where(m == -float("inf"), 0.0, tl.exp(m - top))
        acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=(c < S)[:, None], other=0.0, cache_modifier=".cg")
        o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(o_ptr + bh * D + d, o.to(o_ptr.dtype.element_ty))
except ImportError:
    _combine_parts = None


_COUNTERS: dict = {}  # device -> int32 zeros, one per (row, query head): the folded combination's
COUNTERS = 1 << 12  # programs-done counters (each launch leaves them at zero)


def _counters(device: torch.device, n: int):
    """The folded combination's counters for n (row, query head) pairs, or None where it cannot
    fold: more pairs than COUNTERS, or the first use inside a CUDA graph capture (the counters must
    outlive every graph, so they are made outside one; the graph engine's first call of a shape
    runs eagerly, so a capture finds them made)."""
    key = str(device)
    if n > COUNTERS:
        return None
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


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
    def _attend(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, wr_ptr, ml_ptr, acc_ptr, cnt_ptr, o_ptr,
                scaling, H, HKV, cap, window, S, D: tl.constexpr, CHUNK: tl.constexpr, SP: tl.constexpr,
                FOLD: tl.constexpr, PDL: tl.constexpr):
        # program (row b, query head h, chunk c of CHUNK keys): its part of the softmax
        if PDL:  # launched while the previous kernel runs (pdl.py): nothing is touched before it is done
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.program_id(2)
        G = H // HKV
        kvh = h // G
        half: tl.constexpr = D // 2
        dt = qkv_ptr.dtype.element_ty
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
        if (h % G == 0) & (c == 0):  # one program per K/V head writes the slot
            tl.store(k_ptr + base + slot * D + d, kn, mask=write & (d < D))
            tl.store(v_ptr + base + slot * D + d, vn, mask=write & (d < D))
            if h == 0:
                old = tl.load(valid_ptr + b * cap + slot)
                tl.store(valid_ptr + b * cap + slot, (old != 0) | write)
        key = c * CHUNK + tl.arange(0, CHUNK)
        lo = tl.where(window > 0, slot - window + 1, 0)
        inside = (key <= slot) & (key >= lo)
        own = key == slot
        kb = tl.load(k_ptr + base + key[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        vb = tl.load(v_ptr + base + key[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        # the slot's new K/V from registers: the writing program may not have stored them yet
        new = own & write
        kb = tl.where(new[:, None], kn[None, :], kb).to(tl.float32)
        vb = tl.where(new[:, None], vn[None, :], vb).to(tl.float32)
        sc = tl.sum(kb * q[None, :], axis=1).to(dt).to(tl.float32)
        sc = (sc * scaling).to(dt).to(tl.float32)
        seen = tl.load(valid_ptr + b * cap + key, mask=inside & ~own, other=0) != 0
        sc = tl.where((seen & inside) | own, sc, -float("inf"))
        m = tl.max(sc, axis=0)
        p = tl.exp(sc - tl.where(m == -float("inf"), 0.0, m))  # a chunk with no key seen: all zero
        part = (b * H + h) * S + c
        tl.store(ml_ptr + part * 2, m)
        tl.store(ml_ptr + part * 2 + 1, tl.sum(p, axis=0))
        tl.store(acc_ptr + part * D + d, tl.sum(p[:, None] * vb, axis=0))
        if FOLD:
            # The combination by the head's last program to finish (one kernel a layer fewer): the
            # counter's atomic (acquire-release, GPU scope) orders every program's parts before it;
            # the last one reads them past L1 and puts the counter back to zero for the next launch.
            done = tl.atomic_add(cnt_ptr + b * H + h, 1)
            if done == S - 1:
                _combine_parts(ml_ptr, acc_ptr, o_ptr, b * H + h, S, D, SP)
                tl.store(cnt_ptr + b * H + h, 0)

    @triton.jit
    def _combine(ml_ptr, acc_ptr, o_ptr, H, S, D: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
        # program (row, query head): the chunks' parts rescaled to their common maximum
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _combine_parts(ml_ptr, acc_ptr, o_ptr, tl.program_id(0) * H + tl.program_id(1), S, D, SP)

    @triton.jit
    def _attend_rows(q_ptr, k_ptr, v_ptr, al_ptr, ml_ptr, acc_ptr, scaling, H, HKV, T, cap, keys, S,
                     D: tl.constexpr, CHUNK: tl.constexpr, BQ: tl.constexpr, PDL: tl.constexpr):
        # A window of T positions (catch-up / verify / speculate): program (row b, K/V head, chunk c
        # of CHUNK keys) takes the G query heads x T positions of its K/V head as one [G*T, D] tile,
        # so each K/V chunk is read once for all of them and both products run on the tensor cores.
        # Rotary, the K/V write and the mask are the torch code's (`allowed`, made before the write).
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        c = tl.program_id(2)
        G = H // HKV
        dt = q_ptr.dtype.element_ty
        r = tl.arange(0, BQ)  # tile row r: query head kvh * G + r // T, position r % T
        rin = r < G * T
        h = kvh * G + r // T
        t = r % T
        d = tl.arange(0, D)
        q = tl.load(q_ptr + ((b * H + h) * T + t)[:, None] * D + d[None, :], mask=rin[:, None], other=0.0)
        key = c * CHUNK + tl.arange(0, CHUNK)
        kin = key < keys
        base = (b * HKV + kvh) * cap * D
        kb = tl.load(k_ptr + base + key[:, None] * D + d[None, :], mask=kin[:, None], other=0.0)
        vb = tl.load(v_ptr + base + key[:, None] * D + d[None, :], mask=kin[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(kb)).to(dt).to(tl.float32)  # [BQ, CHUNK], rounded as torch's matmul
        sc = (sc * scaling).to(dt).to(tl.float32)
        al = tl.load(al_ptr + (b * T + t)[:, None] * keys + key[None, :], mask=rin[:, None] & kin[None, :], other=0)
        sc = tl.where(al != 0, sc, -float("inf"))
        m = tl.max(sc, axis=1)
        p = tl.exp(sc - tl.where(m == -float("inf"), 0.0, m)[:, None])  # a row with no key seen: all zero
        part = ((b * H + h) * T + t) * S + c
        tl.store(ml_ptr + part * 2, m, mask=rin)
        tl.store(ml_ptr + part * 2 + 1, tl.sum(p, axis=1), mask=rin)
        acc = tl.dot(p.to(dt), vb)  # [BQ, D]
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=rin[:, None])

    def launch_rows(q, kbuf, vbuf, allowed, scaling):
        B, H, T, D = q.shape
        HKV, cap = kbuf.shape[1], kbuf.shape[2]
        keys = allowed.shape[-1]
        chunk = 64 if D <= 128 else 32
        S = triton.cdiv(keys, chunk)
        ml = torch.empty(B, H, T, S, 2, dtype=torch.float32, device=q.device)
        acc = torch.empty(B, H, T, S, D, dtype=torch.float32, device=q.device)
        o = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
        BQ = max(16, triton.next_power_of_2((H // HKV) * T))
        kw = pdl.launch_kw(q)
        _attend_rows[(B, HKV, S)](q, kbuf, vbuf, allowed, ml, acc, float(scaling), H, HKV, T, cap, keys, S,
                                  D=D, CHUNK=chunk, BQ=BQ, num_warps=4, **kw)
        # the same combination as one token's, over (row, query head x position)
        _combine[(B, H * T)](ml, acc, o, H * T, S, D=D, SP=triton.next_power_of_2(S), num_warps=4, **kw)
        return o

    def launch(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window):
        B, HKV, cap, D = kbuf.shape
        chunk = 64 if D <= 128 else 32
        S = triton.cdiv(cap, chunk)
        ml = torch.empty(B, n_heads, S, 2, dtype=torch.float32, device=qkv.device)
        acc = torch.empty(B, n_heads, S, D, dtype=torch.float32, device=qkv.device)
        o = torch.empty(B, n_heads * D, dtype=qkv.dtype, device=qkv.device)
        kw = pdl.launch_kw(qkv)
        SP = triton.next_power_of_2(S)
        cnt = _counters(qkv.device, B * n_heads) if FOLD else None
        _attend[(B, n_heads, S)](qkv, cos, sin, kbuf, vbuf, valid, slot, write, ml, acc, cnt if cnt is not None else ml,
                                 o, float(scaling), n_heads, HKV, cap, int(window or 0), S, D=D, CHUNK=chunk, SP=SP,
                                 FOLD=cnt is not None, num_warps=4, **kw)
        if cnt is None:
            _combine[(B, n_heads)](ml, acc, o, n_heads, S, D=D, SP=SP, num_warps=4, **kw)
        return o

    launch.rows = launch_rows
    launch.jit = {"_attend": _attend, "_combine": _combine, "_attend_rows": _attend_rows}  # tests compile them
    return launch


def _make_op():
    launch = kernels()
    if launch is None:
        return False, False

    @torch.library.custom_op("meestral::decode_attention", mutates_args=("kbuf", "vbuf", "valid"))
    def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kbuf: torch.Tensor,
                         vbuf: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor, write: torch.Tensor,
                         scaling: float, n_heads: int, window: int) -> torch.Tensor:
        return launch(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window)

    @decode_attention.register_fake
    def _(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window):
        return qkv.new_empty(qkv.shape[0], n_heads * kbuf.shape[-1])

    @torch.library.custom_op("meestral::window_attention", mutates_args=())
    def window_attention(q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, allowed: torch.Tensor,
                         scaling: float) -> torch.Tensor:
        return launch.rows(q, kbuf, vbuf, allowed, scaling)

    @window_attention.register_fake
    def _(q, kbuf, vbuf, allowed, scaling):
        return torch.empty_like(q)

    return decode_attention, window_attention


# Made at import, as backbones/gemv.py's op (a registration inside a traced function breaks its graph).
_OP, _WINDOW_OP = _make_op() if torch.cuda.is_available() else (False, False)
_HAVE_OP = _OP is not False


def _kernels_take(x: torch.Tensor, kbuf: torch.Tensor) -> bool:
    """What both kernels need: CUDA, bf16 / fp16, contiguous buffers, a power-of-two head_dim, no
    gradients, a cache whose parts per head fit (MAX_KEYS)."""
    D = kbuf.shape[-1]
    return (_HAVE_OP and ENABLED and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and kbuf.dtype == x.dtype and kbuf.is_contiguous() and D & (D - 1) == 0 and D >= 16
            and kbuf.shape[2] <= MAX_KEYS and not x.requires_grad)


def applies(qkv: torch.Tensor, kbuf: torch.Tensor) -> bool:
    """Whether the kernel takes this step's attention: one token (the caller's test), and
    `_kernels_take`."""
    return _kernels_take(qkv, kbuf)


# Windows up to this many query rows per K/V head (query heads per K/V head x positions) take the
# window kernel: one tile of them per K/V head and chunk of keys.
MAX_TILE = 128


def applies_window(q: torch.Tensor, kbuf: torch.Tensor) -> bool:
    """Whether the window kernel takes the attention of q [B, H, T, D] (T > 1, rotated) over kbuf:
    as `applies`, for a window whose query heads x positions per K/V head fit one tile."""
    B, H, T, D = q.shape
    return T > 1 and WINDOW and H // kbuf.shape[1] * T <= MAX_TILE and _kernels_take(q, kbuf)


def attend_window(q, kbuf, vbuf, allowed, scaling):
    """softmax(q K^T * scaling, masked to `allowed` [B, T, keys]) V over the first keys slots of the
    (already written) buffers, for q [B, H, T, D]: -> [B, H, T, D]; only where `applies_window`."""
    return _WINDOW_OP(q.contiguous(), kbuf, vbuf, allowed.contiguous(), float(scaling))


def attend(qkv, cos, sin, kbuf, vbuf, valid, slot, write, scaling, n_heads, window):
    """The kernel's attention (see `kernels`); only where `applies` says so."""
    return _OP(qkv.contiguous(), cos.contiguous(), sin.contiguous(), kbuf, vbuf, valid, slot, write.contiguous(),
               float(scaling), n_heads, int(window or 0))
