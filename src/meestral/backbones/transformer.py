"""Adapter for the Mistral / Llama family (HF `MistralForCausalLM`, `LlamaForCausalLM`).

Blocks are HF's own decoder layers, called one at a time. Their attention writes K/V through a
small slot cache of ours (`_SlotCache.update`, the one method HF attention calls on a cache) into
fixed-shape per-layer buffers; we build the 4-D attention mask ourselves from a per-layer
`valid` map. That gives per-row control (padding, rows that exited, later per-row backlogs)
without forking any HF code, and shapes that never change during a generation.
"""

from __future__ import annotations

import inspect

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from meestral.backbones import decode_attention, gemv
from meestral.backbones.base import Backbone, LayerCost, Step, plain, rms_norm


class KVState:
    """Per-layer K/V slot buffers: k[i], v[i] are [B, Hkv, capacity, D]; valid[i] is [B, capacity]."""

    def __init__(self, num_layers, batch_size, capacity, n_kv, head_dim, dtype, device):
        shape = (num_layers, batch_size, n_kv, capacity, head_dim)
        # Every layer's buffer is a view into one tensor per K and V: the `copy` fill of a run of
        # skipped layers is then one kernel over all of them (`_copy_layers_fixed`), not one each.
        self.k_all = torch.zeros(shape, dtype=dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))
        self.valid = torch.zeros(num_layers, batch_size, capacity, dtype=torch.bool, device=device)

    @property
    def capacity(self) -> int:
        return self.valid.shape[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + self.valid.numel()


class _SlotCache:
    """Duck-typed HF cache: HF attention calls `update(k, v, layer_idx, ...)` and uses what it returns."""

    def __init__(self, state: KVState):
        self.state = state
        self.step: Step | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s = self.step
        end = s.start + s.length
        w = s.write[:, None, :, None]
        for buf, new in ((self.state.k[layer_idx], key_states), (self.state.v[layer_idx], value_states)):
            window = buf[:, :, s.start:end]
            window.copy_(torch.where(w, new.to(buf.dtype), window))
        self.state.valid[layer_idx, :, s.start:end] |= s.write
        return self.state.k[layer_idx][:, :, :end], self.state.v[layer_idx][:, :, :end]


def _rotate(x, cos, sin):
    """HF's apply_rotary_pos_emb for one tensor [B, H, T, D] (cos/sin [B, T, D])."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def _write_kv(kbuf, vbuf, valid, k, v, slots, write):
    """K/V [B, Hkv, T, D] into the slot buffers at `slots` for the written (row, slot) pairs."""
    w = write[:, None, :, None]
    kbuf.index_copy_(2, slots, torch.where(w, k.to(kbuf.dtype), kbuf.index_select(2, slots)))
    vbuf.index_copy_(2, slots, torch.where(w, v.to(vbuf.dtype), vbuf.index_select(2, slots)))
    valid.index_copy_(1, slots, valid.index_select(1, slots) | write)


def _attend(q, k, v, kbuf, vbuf, valid, slots, write, shown, causal, own, scaling):
    """Grouped attention of q [B, H, T, D] over the first `keys` cache slots (keys =
    causal.shape[-1]) after writing k/v at `slots`: each K/V head read once for its G query heads
    (no repeat_kv), the mask made from the layer's validity before its write, softmax in float32
    as HF's eager attention. Returns [B, T, H*D]."""
    B, H, T, D = q.shape
    n_kv = kbuf.shape[1]
    G, keys = H // n_kv, causal.shape[-1]
    allowed = ((valid[:, :keys] | shown)[:, None, :] & causal) | own  # [B, T, keys]
    _write_kv(kbuf, vbuf, valid, k, v, slots, write)
    if decode_attention.applies_window(q, kbuf):  # a window on the GPU: products and softmax in Triton
        return decode_attention.attend_window(q, kbuf, vbuf, allowed, scaling).transpose(1, 2).reshape(B, T, -1)
    allowed = allowed.repeat(1, G, 1)[:, None]  # [B, 1, G*T, keys]: row g*T + t
    scores = torch.matmul(q.reshape(B, n_kv, G * T, D), kbuf[:, :, :keys].transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vbuf[:, :, :keys]).view(B, H, T, D).transpose(1, 2).reshape(B, T, -1)


def _decoder_fixed(h, ln1, w_qkv, w_o, ln2, w_gu, w_down, kbuf, vbuf, valid, slots, write, shown, causal, own,
                   cos, sin, eps: float, n_heads: int, n_kv: int, head_dim: int, scaling: float, window: int = 0):
    """One Mistral/Llama decoder layer (SiLU MLP, no biases) over the first `keys` cache slots
    (keys = causal.shape[-1]), as a pure function of tensors: the graph engine compiles it once
    for every layer of a shape, and inductor fuses what lies between the four matmuls.

    q/k/v come from one matmul over the concatenated projections, gate/up from another (the
    backbone's weights are views into those concatenations: no copy); attention is `_attend`. At
    batch 1 on a GPU the matmuls are gemv.py's, which can also take the norms, the SiLU gate and
    the residual adds into themselves (`gemv.FUSED`)."""
    B, T, _ = h.shape
    D = head_dim
    qkv = gemv.norm_linear(h, ln1, eps, w_qkv, rms_norm)
    if T == 1 and decode_attention.applies(qkv, kbuf):
        # one token on the GPU: rotary, the K/V write and the attention in one kernel
        o = decode_attention.attend(qkv[:, 0], cos[:, 0], sin[:, 0], kbuf, vbuf, valid, slots, write[:, 0], scaling,
                                    n_heads, window).view(B, 1, n_heads * D)
    else:
        q, k, v = qkv.split([n_heads * D, n_kv * D, n_kv * D], dim=-1)
        q = _rotate(q.view(B, T, n_heads, D).transpose(1, 2), cos, sin)
        k = _rotate(k.view(B, T, n_kv, D).transpose(1, 2), cos, sin)
        v = v.view(B, T, n_kv, D).transpose(1, 2)
        o = _attend(q, k, v, kbuf, vbuf, valid, slots, write, shown, causal, own, scaling)
    h = gemv.linear_residual(o, w_o, h)
    return gemv.gated_linear_residual(gemv.norm_linear(h, ln2, eps, w_gu, rms_norm), w_down, h)


def _propagate_fixed(h, ln1, w_kv, kbuf, vbuf, valid, slots, write, cos, sin, eps: float, n_kv: int, head_dim: int):
    """The `propagate` policy's state-only step of one layer: K/V of h written at the slots."""
    B, T, _ = h.shape
    k, v = gemv.norm_linear(h, ln1, eps, w_kv, rms_norm).chunk(2, dim=-1)
    k = _rotate(k.view(B, T, n_kv, head_dim).transpose(1, 2), cos, sin)
    v = v.view(B, T, n_kv, head_dim).transpose(1, 2)
    _write_kv(kbuf, vbuf, valid, k, v, slots, write)


def _copy_fixed(kbuf, vbuf, valid, slots, w):
    """The `copy` fill of one skipped layer: the previous slot's K/V (and validity) into this slot
    for rows w [B]. A pure function, compiled with the rest: eager, it is eight small kernels a layer."""
    prev = slots - 1
    w4 = w[:, None, None, None]
    kbuf.index_copy_(2, slots, torch.where(w4, kbuf.index_select(2, prev), kbuf.index_select(2, slots)))
    vbuf.index_copy_(2, slots, torch.where(w4, vbuf.index_select(2, prev), vbuf.index_select(2, slots)))
    valid.index_copy_(1, slots, valid.index_select(1, slots) | (w[:, None] & valid.index_select(1, prev)))


def _copy_layers_fixed(k_all, v_all, valid, slots, w, lo: int, hi: int):
    """`_copy_fixed` for the layers lo..hi-1 at once (k_all / v_all [L, B, Hkv, capacity, D], valid
    [L, B, capacity]): one kernel for the whole run of skipped layers. Every layer's slot is read
    and rewritten, the others' unchanged (a few KB): a slice of the layers, written through a view,
    would make inductor copy that whole slice of the cache first."""
    prev = slots - 1
    layer = torch.arange(k_all.shape[0], device=w.device)
    fill = ((layer >= lo) & (layer < hi))[:, None] & w[None, :]  # [L, B]
    f5 = fill[:, :, None, None, None]
    for buf in (k_all, v_all):
        buf.index_copy_(3, slots, torch.where(f5, buf.index_select(3, prev), buf.index_select(3, slots)))
    valid.index_copy_(2, slots, valid.index_select(2, slots) | (fill[:, :, None] & valid.index_select(2, prev)))


def _fuse_rows(linears):
    """Concatenate the weights of `linears` along the output dimension and make each module's
    weight a view into the result: one matmul reads them all, and no memory is duplicated."""
    ws = [m.weight for m in linears]
    fused = torch.cat([w.detach() for w in ws])
    at = 0
    for m, w in zip(linears, ws):
        n = w.shape[0]
        m.weight.data = fused[at:at + n]
        at += n
    return fused


class TransformerBackbone(Backbone):
    family = "transformer"

    def __init__(self, model, tokenizer, name: str):
        super().__init__(model, tokenizer, name)
        self.arch = model.config.model_type  # "mistral" | "llama"
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.n_heads = cfg.num_attention_heads
        self.sliding_window = getattr(cfg, "sliding_window", None)
        # HF renamed the block's cache keyword (past_key_values -> cache) during 5.x; use the
        # name this version declares so no deprecation shim is involved.
        params = inspect.signature(type(self.blocks[0]).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---- modules ---------------------------------------------------------------------------
    @property
    def blocks(self):
        return self.model.model.layers

    @property
    def embedding(self):
        return self.model.model.embed_tokens

    @property
    def norm_module(self):
        return self.model.model.norm

    @property
    def trunk(self):
        return self.model.model

    # Every matrix of attention and MLP: LayerSkip-style adaptation changes what each block
    # writes into the residual stream, and both halves write to it.
    lora_targets = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    # ---- state -----------------------------------------------------------------------------
    def new_state(self, batch_size, capacity):
        return KVState(self.num_layers, batch_size, capacity, self.n_kv, self.head_dim, self.dtype, self.device)

    # Above this many mask elements (layers x rows x queries x keys) a step's masks are made per
    # layer from shared parts instead of all at once: long prompts would need gigabytes.
    MASK_ALL_LAYERS_MAX = 1 << 24

    def _mask(self, i: int, state: KVState, step: Step) -> torch.Tensor:
        """[B, 1, T, end] mask of layer i: keys valid in layer i or visible in this step, causal,
        inside the sliding window; every query may also see its own slot so that rows not written
        in this call (padding, exited rows) never produce an all-masked softmax.

        Built once per step for every layer from `valid [L, B, capacity]` (before the step's
        writes: a layer's own validity cannot change before it runs) and shared by the step."""
        shared = step.shared
        if shared.mask_parts is None:
            end = step.start + step.length
            dev = step.write.device
            keys = torch.arange(end, device=dev)
            queries = torch.arange(step.start, end, device=dev)
            causal = keys[None, :] <= queries[:, None]  # [T, end]
            if self.sliding_window:
                causal &= keys[None, :] > queries[:, None] - self.sliding_window
            own = keys[None, :] == queries[:, None]
            valid = state.valid[:, :, :end].clone()  # [L, B, end]
            valid[:, :, step.start:end] |= step.visible[None]
            every = valid.shape[0] * valid.shape[1] * causal.numel() <= self.MASK_ALL_LAYERS_MAX
            shared.mask = self._allowed(valid, causal, own) if every else None
            shared.mask_parts = (valid, causal, own)
        if shared.mask is not None:
            return shared.mask[i]
        valid, causal, own = shared.mask_parts
        return self._allowed(valid[i], causal, own)

    def _allowed(self, valid, causal, own):
        """valid [..., B, end] keys x causal/own [T, end] -> the attention mask [..., B, 1, T, end]."""
        allowed = (valid[..., None, :] & causal) | own
        allowed = allowed.unsqueeze(-3)
        if self.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(self.dtype).min
            )
        return allowed

    def _rope(self, h, step):
        rope = step.shared.rope
        if h.dtype not in rope:
            rope[h.dtype] = self.model.model.rotary_emb(h, step.positions)
        return rope[h.dtype]

    def forward_layer(self, i, h, state, step):
        cache = _SlotCache(state)
        cache.step = step
        out = self.blocks[i](
            h,
            attention_mask=self._mask(i, state, step),
            position_ids=step.positions,
            position_embeddings=self._rope(h, step),
            use_cache=True,
            **{self._cache_kw: cache},
        )
        return (out[0] if isinstance(out, tuple) else out), None

    def fill_copy(self, i, state, step):
        # The skipped layer gets the previous slot's K/V (CALM-style state copying).
        assert step.start > 0, "copy needs a previous slot"
        s, w = step.start, step.write[:, 0]
        for buf in (state.k[i], state.v[i]):
            buf[:, :, s] = torch.where(w[:, None, None], buf[:, :, s - 1], buf[:, :, s])
        state.valid[i, :, s] |= w & state.valid[i, :, s - 1]

    def _kv(self, i, h, step, rope=None):
        """K (rotated) and V of block i for hidden states h, exactly as its attention makes them."""
        block = self.blocks[i]
        attn = block.self_attn
        x = block.input_layernorm(h)
        shape = (*x.shape[:-1], -1, self.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = self._rope(h, step) if rope is None else rope
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def fill_propagate(self, i, h, state, step):
        k, v = self._kv(i, h, step)
        cache = _SlotCache(state)
        cache.step = step
        cache.update(k, v, i)

    # ---- the fixed-shape path (graph_engine.py; see Backbone.forward_layer_fixed) ------------
    def state_keys(self, state):
        return state.capacity

    def fixed_context(self, layers, h, state, step, keys):
        """What every layer of one fixed-shape call shares, computed on the device at its start:
        rotary cos/sin of the step's positions, and the parts each layer's attention mask is made
        of over the first `keys` slots: causal (and sliding-window) [T, keys], each query's own
        slot [T, keys], and this step's visible slots [B, keys]. A layer adds its own validity
        before its write, as `_mask` does."""
        slots = step.slots
        ar = torch.arange(keys, device=slots.device)
        causal = ar[None, :] <= slots[:, None]  # [T, keys]
        if self.sliding_window:
            causal &= ar[None, :] > slots[:, None] - self.sliding_window
        own = ar[None, :] == slots[:, None]
        shown = (own[None] & step.visible[:, :, None]).any(1)  # [B, keys]
        return {"rope": self.model.model.rotary_emb(h, step.positions), "causal": causal, "own": own, "shown": shown}

    def _write_fixed(self, state, i, k, v, step):
        """Write K/V [B, Hkv, T, D] at the step's slots for the written (row, slot) pairs."""
        _write_kv(state.k[i], state.v[i], state.valid[i], k, v, step.slots, step.write)

    def _fused(self, i):
        """Layer i's concatenated q/k/v and gate/up weights (None where the fused layer does not
        apply: biases, an activation other than SiLU). Made once; rebuilt if a weight was replaced
        (the modules' weights are views into these)."""
        block = self.blocks[i]
        attn, mlp = block.self_attn, block.mlp
        cache = self.__dict__.setdefault("_fused_cache", {})
        got = cache.get(i)
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        gu = (mlp.gate_proj, mlp.up_proj)
        if got is not None and got[0].data_ptr() == attn.q_proj.weight.data_ptr() \
                and got[1].data_ptr() == mlp.gate_proj.weight.data_ptr():
            return got
        no_bias = all(m.bias is None for m in (*qkv, attn.o_proj, *gu, mlp.down_proj))
        if not no_bias or getattr(self.config, "hidden_act", "silu") != "silu":
            cache[i] = None
            return None
        cache[i] = (_fuse_rows(qkv), _fuse_rows(gu))
        return cache[i]

    def forward_layer_fixed(self, i, h, state, step, keys, ctx=None, kernel=plain):
        """HF's decoder layer, step for step, as `_decoder_fixed` (grouped attention over the first
        `keys` cache slots, no repeat_kv, fused projections); layers with biases or another
        activation run HF's own modules with the same attention."""
        if ctx is None:
            ctx = self.fixed_context([i], h, state, step, keys)
        fused = self._fused(i)
        block = self.blocks[i]
        attn = block.self_attn
        cos, sin = ctx["rope"]
        if fused is not None:
            fn = kernel(_decoder_fixed)
            return fn(h, block.input_layernorm.weight, fused[0], attn.o_proj.weight, block.post_attention_layernorm.weight,
                      fused[1], block.mlp.down_proj.weight, state.k[i], state.v[i], state.valid[i], step.slots,
                      step.write, ctx["shown"], ctx["causal"], ctx["own"], cos, sin,
                      float(block.input_layernorm.variance_epsilon), self.n_heads, self.n_kv, self.head_dim,
                      float(attn.scaling), int(self.sliding_window or 0)), None
        B, T, _ = h.shape
        D = self.head_dim
        x = block.input_layernorm(h)
        q = attn.q_proj(x).view(B, T, -1, D).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, D).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = _attend(q, k, v, state.k[i], state.v[i], state.valid[i], step.slots, step.write, ctx["shown"],
                    ctx["causal"], ctx["own"], attn.scaling)
        h = h + attn.o_proj(o)
        return h + block.mlp(block.post_attention_layernorm(h)), None

    def fill_copy_fixed(self, i, state, step, kernel=plain):
        kernel(_copy_fixed)(state.k[i], state.v[i], state.valid[i], step.slots, step.write[:, 0])

    def fill_copy_layers_fixed(self, layers, state, step, kernel=plain):
        # a run of consecutive layers (what an exit skips) in one call over the stacked buffers
        if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
            kernel(_copy_layers_fixed)(state.k_all, state.v_all, state.valid, step.slots, step.write[:, 0],
                                       layers[0], layers[-1] + 1)
        else:
            super().fill_copy_layers_fixed(layers, state, step, kernel)

    def fill_propagate_fixed(self, i, h, state, step, keys, ctx=None, kernel=plain):
        rope = self.model.model.rotary_emb(h, step.positions) if ctx is None else ctx["rope"]
        fused = self._fused(i)
        if fused is None:
            k, v = self._kv(i, h, step, rope)
            self._write_fixed(state, i, k, v, step)
            return
        block, nq = self.blocks[i], self.n_heads * self.head_dim
        kernel(_propagate_fixed)(
            h, block.input_layernorm.weight, fused[0][nq:], state.k[i], state.v[i], state.valid[i], step.slots,
            step.write, rope[0], rope[1], float(block.input_layernorm.variance_epsilon), self.n_kv, self.head_dim)

    def layer_tensors(self, state, i):
        return [state.k[i], state.v[i], state.valid[i]]

    can_truncate = True

    def truncate(self, state, keep, rows):
        # K/V live in position-indexed slots: marking slots >= keep invalid removes them exactly;
        # later writes overwrite them.
        slots = torch.arange(state.capacity, device=keep.device)
        drop = (slots[None, :] >= keep[:, None]) & rows[:, None]
        state.valid &= ~drop[None]

    # ---- costs -----------------------------------------------------------------------------
    def layer_cost(self, i):
        block = self.blocks[i]
        params = sum(p.numel() for p in block.parameters())
        attn = block.self_attn
        prop = block.input_layernorm.weight.numel() + attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
        return LayerCost(params=params, flops=2.0 * params, propagate_params=prop, propagate_flops=2.0 * prop)

    def attention_flops(self, i, context):
        # QK^T and attention-weighted V: 2 matmuls of n_heads x head_dim x context, 2 FLOPs each.
        window = min(context, self.sliding_window) if self.sliding_window else context
        return 4.0 * self.n_heads * self.head_dim * window
