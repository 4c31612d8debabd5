"""Adapter for state-space models: HF `Mamba2ForCausalLM` (Codestral Mamba) and `MambaForCausalLM`.

The block's norm and every weight are HF's own modules; the mixer's recurrence is stepped here,
token by token from an explicit state, because early exit needs what the HF mixer cannot give
through a stable API: per-row state updates (padding, rows that exited), a multi-token
continuation from an arbitrary state (HF's Mamba-1 torch path restarts from zero for more than one
token), state-only steps for `propagate` and exact snapshots. HF's cache API also changed between
the 5.x releases we support. Tests check every block against the HF full forward.

State per layer: `conv[i]` holds the last `conv_kernel` inputs of the causal conv (as HF's cache
does) and `ssm[i]` the recurrent state: a Mamba-2 state in the model's dtype, as HF's decode cache
keeps it (STATE_IN_MODEL_DTYPE; float32 with `--ssm-state float32`), a Mamba-1 state in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meestral.backbones import gemv, mamba2_step
from meestral.backbones.base import Backbone, LayerCost, plain, rms_norm

# Windows longer than this take the per-module path even on the fixed path: the fused step unrolls
# its token loop, and a prompt-length unroll would compile for minutes to save nothing (a long
# window is bound by its matmuls, not by launches). Catch-up windows are max_backlog + 1 tokens.
FUSED_MAX_TOKENS = 16

# A Mamba-2 model's recurrent state in the model's dtype (bf16 / fp16) instead of float32, rounded
# after every token, as HF's decode cache and mamba-ssm's inference cache store it: half the state
# traffic of a decode step (Codestral-Mamba-7B: 2 MB a block read and written instead of 4 MB).
# The update and the read-out still compute in float32 from the stored state; every path (the
# per-module step, the fixed path, the Triton kernels) rounds the state after every token, also
# inside a window of tokens (catch-up's deep pass, verify), so a window leaves the state its tokens
# leave one step at a time (tests: bit for bit on the CPU and between window lengths on the GPU).
# On by default: on an H100 it made full depth 2.2% faster on the Codestral-Mamba-7B shape (three
# repeats, 180.3 against 176.5 tok/s; benchmarks/NOTES.md, 2026-12-07 eleventh session; the bench's
# `full_float32_state` row, switch `ssm-state`, times the other choice) and it is what the peers
# keep. `meestral ... --ssm-state float32` keeps the float32 state the float32 scan computes, the
# more accurate choice for long generations in bf16. A float32 model's state is float32 either way;
# Mamba-1 keeps float32.
STATE_IN_MODEL_DTYPE = True


def _mamba2_fixed(h, norm_w, in_w, in_b, conv_w, conv_b, dt_bias, A_log, D, gnorm_w, out_w, out_b,
                  conv_state, ssm_state, write, hist_conv=None, hist_ssm=None, hist_at=None, *, eps, gnorm_eps,
                  group_size, n_heads, head_dim, n_groups, state_size, intermediate, conv_dim, dt_min, dt_max,
                  residual_in_fp32, output=True):
    """One Mamba-2 block over h [B, T, d] from the stored state, as `forward_layer` (output=True:
    returns (h_out, mixed)) or `fill_propagate` (output=False: state only, returns None) compute it.

    A pure function of tensors, so that one torch.compile serves every layer (`base.compiled`):
    module objects or per-layer Python values here would make dynamo guard on them and recompile
    per layer. Each operation mirrors HF's modules and `SSMBackbone._mixer` in the same order and
    dtypes, so the eager call equals the per-module path exactly. The state is carried through the
    token loop in locals and written back once: compiled, the update then fuses with the step.
    With `hist_conv`/`hist_ssm` (a StateHistory's layer buffers) the state after each written token
    is also kept there, at position `hist_at[t]` (its slot modulo the history's length).
    """
    Bsz, T, _ = h.shape
    I, H, P, G, N = intermediate, n_heads, head_dim, n_groups, state_size
    udt = norm_w.dtype  # the block's Mamba2RMSNorm output dtype
    # the gate rows are a third of in_proj and only the output needs them
    w_in, b_in = (in_w, in_b) if output else (in_w[I:], None if in_b is None else in_b[I:])
    # the cast and the norm inside in_proj's GEMV where gemv.FUSED_MAMBA_NORM says so (its comment)
    proj = gemv.cast_norm_linear(h, norm_w, eps, w_in, b_in, rms_norm)
    if output:
        gate, xbc, dt = proj.split([I, conv_dim, H], dim=-1)
    else:
        xbc, dt = proj.split([conv_dim, H], dim=-1)
    kernel = conv_w[:, 0, :]
    if mamba2_step.applies(proj, conv_state, ssm_state):
        # On the GPU: conv, scan and gated norm as two Triton kernels (mamba2_step.py), the whole
        # window at once, or token by token where each token's state is kept
        dims = dict(n_heads=H, head_dim=P, n_groups=G, state_size=N, intermediate=I, group_size=group_size,
                    gnorm_eps=gnorm_eps, dt_min=dt_min, dt_max=dt_max)
        gw = gnorm_w if output else None
        if hist_conv is None:
            y = mamba2_step.step(proj, conv_state, ssm_state, write, kernel, conv_b, dt_bias, A_log, D, gw, **dims)
        else:
            ys = []
            for t in range(T):
                ys.append(mamba2_step.step(proj[:, t:t + 1], conv_state, ssm_state, write[:, t:t + 1], kernel, conv_b,
                                           dt_bias, A_log, D, gw, **dims))
                _keep(hist_conv, hist_at[t:t + 1], conv_state[:, None])
                _keep(hist_ssm, hist_at[t:t + 1], ssm_state[:, None])
            y = torch.cat(ys, 1) if output else None
        return _out_proj(h, y, out_w, out_b, residual_in_fp32) if output else None
    A = -torch.exp(A_log.float())
    Df = D.float()
    cs, ss, ys, kept_c, kept_s = conv_state, ssm_state, [], [], []
    for t in range(T):  # unrolled when compiled or captured: no Python runs per token at replay
        w = write[:, t]
        window = torch.cat([cs[:, :, 1:], xbc[:, t, :, None].to(cs.dtype)], dim=-1)
        cs = torch.where(w[:, None, None], window, cs)
        c = (window * kernel).sum(-1)
        if conv_b is not None:
            c = c + conv_b
        c = F.silu(c)
        xs, Bm, Cm = torch.split(c, [I, G * N, G * N], dim=-1)
        xs = xs.float().view(Bsz, H, P)
        Bm = Bm.float().view(Bsz, G, N).repeat_interleave(H // G, dim=1)  # [B, H, N]
        Cm = Cm.float().view(Bsz, G, N).repeat_interleave(H // G, dim=1)
        d = F.softplus(dt[:, t].float() + dt_bias.float()).clamp(min=dt_min, max=dt_max)
        dA = torch.exp(d * A)  # [B, H]
        new = ss * dA[:, :, None, None] + (d[:, :, None] * xs)[..., None] * Bm[:, :, None, :]
        # rounded to the stored state's dtype after every token, as the kernels and a one-token step
        # round it (a no-op for a float32 state)
        ss = torch.where(w[:, None, None, None], new.to(ssm_state.dtype), ss)
        if hist_conv is not None:
            kept_c.append(cs)
            kept_s.append(ss)
        if output:
            ys.append((new * Cm[:, :, None, :]).sum(-1) + Df[None, :, None] * xs)
    conv_state.copy_(cs)
    ssm_state.copy_(ss)
    if hist_conv is not None:
        _keep(hist_conv, hist_at, torch.stack(kept_c, 1))
        _keep(hist_ssm, hist_at, torch.stack(kept_s, 1))
    if not output:
        return None
    y = torch.stack(ys, 1).reshape(Bsz, T, I).to(udt)
    # MambaRMSNormGated: gate in float32, then an RMS norm per group of `group_size` channels.
    yf = y.float() * F.silu(gate.float())
    yg = yf.view(Bsz, T, I // group_size, group_size)
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + gnorm_eps)
    y = gnorm_w * yg.view(Bsz, T, I).to(y.dtype)
    return _out_proj(h, y.to(udt), out_w, out_b, residual_in_fp32)


def _out_proj(h, y, out_w, out_b, residual_in_fp32):
    """The block's end: out_proj of the normed y, added to the residual stream h (the add inside
    the GEMV where it fuses: gemv.linear_residual_keep)."""
    residual = h.float() if residual_in_fp32 else h
    if out_b is None:
        return gemv.linear_residual_keep(y, out_w, residual)
    mixed = gemv.linear(y, out_w, out_b)
    return residual + mixed, mixed


def _keep(buf, at, states):
    """buf[:, at[t]] = states[:, t]: buf [B, R, ...] is one layer's history, at [T] the positions
    (slot modulo R), states [B, T, ...] the state after each token. A (row, token) pair the write
    mask leaves out did not change its row's state, so what is kept there is that unchanged state,
    which is what a restore to it must give. (Keeping the history's old value there instead read
    the history and selected against it: twice the state traffic, per layer and token.)"""
    buf.index_copy_(1, at, states.to(buf.dtype))


class StateHistory:
    """Every layer's conv window and SSM state after each of `positions` consecutive slots
    (kept at slot modulo `positions`): what self-speculation restores when drafts are rejected.
    Per position it holds one full state (`SSMState.nbytes` of it), written once per step that
    runs the layer: a recurrent state cannot be cut back, so it is kept per position instead of
    replaying the accepted tokens (which would read the weights a second time)."""

    def __init__(self, conv, ssm, positions: int):
        self.conv, self.ssm, self.positions = conv, ssm, positions

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)


class GroupedGatedRMSNorm(torch.nn.Module):
    """Mamba-2's gated RMS norm as mamba-ssm defines it: y * silu(gate), then an RMS norm over each
    group of intermediate / n_groups channels. transformers before 5.24 normalised over all
    channels at once, which differs for n_groups > 1 (Codestral Mamba has 8): see
    `use_grouped_gated_norm`. Holds the HF module's own weight, so state dicts keep their names."""

    def __init__(self, weight: torch.nn.Parameter, group_size: int, eps: float):
        super().__init__()
        self.weight = weight
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, hidden_states, gate=None):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        if gate is not None:
            x = x * F.silu(gate.float())
        g = x.view(*x.shape[:-1], x.shape[-1] // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * g.view(x.shape).to(dtype)


def use_grouped_gated_norm(model) -> None:
    """Give every Mamba-2 mixer of an HF model the per-group gated norm where its transformers
    release lacks it (the one adapter function for that change; a no-op from 5.24 on, whose
    `MambaRMSNormGated` has `group_size`). Run on every Mamba-2 model we build or load, so that
    HF's own forward, our chunked scan and our stepped recurrence all compute Mamba-2."""
    if getattr(model.config, "model_type", None) != "mamba2":
        return
    for block in model.backbone.layers:
        m = block.mixer
        if getattr(m.norm, "group_size", None) is None:
            m.norm = GroupedGatedRMSNorm(m.norm.weight, m.intermediate_size // m.n_groups, m.norm.variance_epsilon)


class SSMState:
    def __init__(self, conv, ssm):
        self.conv = conv  # list of [B, conv_dim, K]
        self.ssm = ssm  # list of [B, ...]: float32, or the model's dtype (ssm.STATE_IN_MODEL_DTYPE)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)


class SSMBackbone(Backbone):
    family = "ssm"

    def __init__(self, model, tokenizer, name: str):
        super().__init__(model, tokenizer, name)
        self.arch = model.config.model_type  # "mamba" | "mamba2"
        self.v2 = self.arch == "mamba2"
        self.residual_in_fp32 = bool(getattr(model.config, "residual_in_fp32", False))
        use_grouped_gated_norm(model)

    # ---- modules ---------------------------------------------------------------------------
    @property
    def blocks(self):
        return self.model.backbone.layers

    @property
    def embedding(self):
        return self.model.backbone.embeddings

    @property
    def norm_module(self):
        return self.model.backbone.norm_f

    @property
    def trunk(self):
        return self.model.backbone

    # The mixer's two projections (into x, B, C, dt and the gate; back to the residual stream):
    # they hold nearly all of a block's weights. The conv, A and D are tiny and stay frozen.
    lora_targets = ("mixer.in_proj", "mixer.out_proj")

    def aux_dim(self):
        return self.hidden_size

    def _aux_module(self, layer):
        return self.blocks[layer].mixer

    # ---- state -----------------------------------------------------------------------------
    def new_state(self, batch_size, capacity=None):
        conv, ssm = [], []
        for block in self.blocks:
            m = block.mixer
            c = m.conv1d
            conv.append(torch.zeros(batch_size, c.in_channels, c.kernel_size[0], dtype=c.weight.dtype, device=self.device))
            if self.v2:
                shape = (batch_size, m.num_heads, m.head_dim, m.ssm_state_size)
                dt = m.in_proj.weight.dtype if STATE_IN_MODEL_DTYPE else torch.float32
            else:
                shape = (batch_size, m.intermediate_size, m.ssm_state_size)
                dt = torch.float32
            ssm.append(torch.zeros(shape, dtype=dt, device=self.device))
        return SSMState(conv, ssm)

    # ---- the recurrence --------------------------------------------------------------------
    def _conv_step(self, m, conv_state, u, w):
        """One causal-conv step: u [B, C] enters the window; rows with w False keep their window."""
        window = torch.cat([conv_state[:, :, 1:], u[:, :, None].to(conv_state.dtype)], dim=-1)
        conv_state.copy_(torch.where(w[:, None, None], window, conv_state))
        out = (window * m.conv1d.weight[:, 0, :]).sum(-1)
        if m.conv1d.bias is not None:
            out = out + m.conv1d.bias
        return m.act(out)

    def _ssm_step_v2(self, m, state, xbc, dt, w):
        """Mamba-2 state update for one token; returns y [B, H, P] (before the gated norm)."""
        B_ = xbc.shape[0]
        n, g = m.ssm_state_size, m.n_groups
        x, Bm, Cm = torch.split(xbc, [m.intermediate_size, g * n, g * n], dim=-1)
        x = x.float().view(B_, m.num_heads, m.head_dim)
        rep = m.num_heads // g
        Bm = Bm.float().view(B_, g, n).repeat_interleave(rep, dim=1)  # [B, H, N]
        Cm = Cm.float().view(B_, g, n).repeat_interleave(rep, dim=1)
        dt = F.softplus(dt.float() + m.dt_bias.float())
        dt = dt.clamp(min=m.time_step_limit[0], max=m.time_step_limit[1])  # as HF's scan does
        A = -torch.exp(m.A_log.float())
        dA = torch.exp(dt * A)  # [B, H]
        new = state * dA[:, :, None, None] + (dt[:, :, None] * x)[..., None] * Bm[:, :, None, :]
        state.copy_(torch.where(w[:, None, None, None], new, state))
        y = (new * Cm[:, :, None, :]).sum(-1) + m.D.float()[None, :, None] * x
        return y

    def _ssm_step_v1(self, m, state, x, w):
        """Mamba-1 state update for one token; returns y [B, I] (before the gate)."""
        dt, Bm, Cm = torch.split(m.x_proj(x), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
        dt = dt @ m.dt_proj.weight.t()
        if m.dt_proj.bias is not None:
            dt = dt + m.dt_proj.bias
        dt = F.softplus(dt.float())  # [B, I]
        A = -torch.exp(m.A_log.float())  # [I, N]
        new = torch.exp(A[None] * dt[..., None]) * state + (dt[..., None] * Bm.float()[:, None, :]) * x.float()[..., None]
        state.copy_(torch.where(w[:, None, None], new, state))
        y = (new * Cm.float()[:, None, :]).sum(-1) + m.D.float()[None] * x.float()
        return y

    # ---- per-slot history (Backbone.new_history) ------------------------------------------------
    def new_history(self, batch_size, positions):
        conv, ssm = [], []
        one = self.new_state(batch_size)
        for c, x in zip(one.conv, one.ssm):
            conv.append(c.new_zeros(c.shape[0], positions, *c.shape[1:]))
            ssm.append(x.new_zeros(x.shape[0], positions, *x.shape[1:]))
        return StateHistory(conv, ssm, positions)

    def restore_history(self, state, history, index):
        for i in range(self.num_layers):
            state.conv[i].copy_(history.conv[i].index_select(1, index)[:, 0])
            state.ssm[i].copy_(history.ssm[i].index_select(1, index)[:, 0])

    def _record(self, i, state, step, t):
        """Keep layer i's state after token t of `step` in the step's history, if it keeps one."""
        hist = step.shared.history
        if hist is None:
            return
        at = step.slots[t:t + 1] % hist.positions
        _keep(hist.conv[i], at, state.conv[i][:, None])
        _keep(hist.ssm[i], at, state.ssm[i][:, None])

    def _mixer(self, i, u, state, step, output=True):
        """Run block i's mixer on normed input u [B, T, d], token by token from the stored state.

        The big projections run over all T tokens at once; only the conv window and the scan
        loop over time. With output=False only the state is produced (the `propagate` policy),
        and only the part of in_proj the state needs is computed.
        """
        m = self.blocks[i].mixer
        conv_state, ssm_state = state.conv[i], state.ssm[i]
        T = u.shape[1]
        if self.v2 and output and T > 1 and step.shared.from_empty:
            # A prompt pass into an empty state: the chunked scan gives the outputs and the final
            # conv window and SSM state at once (equal to stepping; tests). Stepping a long
            # left-padded batch moves the whole SSM state through memory once per token.
            from meestral.backbones.ssd import mixer_forward

            out, window, final = mixer_forward(m, u, mask=step.write, states=True)
            conv_state.copy_(window.to(conv_state.dtype))
            ssm_state.copy_(final)
            return out
        if self.v2:
            I, cd = m.intermediate_size, m.conv_dim
            if output:
                proj = m.in_proj(u)
                gate, xbc, dt = proj.split([I, cd, m.num_heads], dim=-1)
            else:
                wgt = m.in_proj.weight[I:]
                bias = m.in_proj.bias[I:] if m.in_proj.bias is not None else None
                xbc, dt = F.linear(u, wgt, bias).split([cd, m.num_heads], dim=-1)
            ys = []
            for t in range(T):
                c = self._conv_step(m, conv_state, xbc[:, t], step.write[:, t])
                ys.append(self._ssm_step_v2(m, ssm_state, c, dt[:, t], step.write[:, t]))
                self._record(i, state, step, t)
            if not output:
                return None
            y = torch.stack(ys, 1).reshape(u.shape[0], T, I)
            y = m.norm(y.to(u.dtype), gate)
            return m.out_proj(y.to(u.dtype))
        I = m.intermediate_size
        if output:
            x_in, gate = m.in_proj(u).chunk(2, dim=-1)
        else:
            wgt = m.in_proj.weight[:I]
            bias = m.in_proj.bias[:I] if m.in_proj.bias is not None else None
            x_in = F.linear(u, wgt, bias)
        ys = []
        for t in range(T):
            c = self._conv_step(m, conv_state, x_in[:, t], step.write[:, t])
            ys.append(self._ssm_step_v1(m, ssm_state, c, step.write[:, t]))
            self._record(i, state, step, t)
        if not output:
            return None
        y = torch.stack(ys, 1) * F.silu(gate.float())
        return m.out_proj(y.to(u.dtype))

    def forward_layer(self, i, h, state, step):
        block = self.blocks[i]
        residual = h.float() if self.residual_in_fp32 else h
        mixed = self._mixer(i, block.norm(h.to(block.norm.weight.dtype)), state, step)
        return residual + mixed, mixed

    fills_on_copy = False

    def fill_copy(self, i, state, step):
        # The skipped layer never sees the token: its conv window and SSM state stay as they were.
        return None

    def fill_propagate(self, i, h, state, step):
        block = self.blocks[i]
        self._mixer(i, block.norm(h.to(block.norm.weight.dtype)), state, step, output=False)

    # ---- the fixed-shape path: one fused function per Mamba-2 block --------------------------
    def _fusable(self, i, T) -> bool:
        """Whether block i can run as `_mamba2_fixed`, which reads the weights, not the modules.

        Not for Mamba-1, a non-SiLU activation, a long window (FUSED_MAX_TOKENS), or a module with
        hooks on it: unmerged LoRA adds its delta in a forward hook, which only a module call sees.
        """
        if not self.v2 or T > FUSED_MAX_TOKENS:
            return False
        block = self.blocks[i]
        m = block.mixer
        if self.config.hidden_act not in ("silu", "swish"):
            return False
        mods = (block.norm, m.in_proj, m.conv1d, m.norm, m.out_proj)
        return not any(x._forward_hooks or x._forward_pre_hooks for x in mods)

    def _fixed_args(self, i, h, state, step):
        block = self.blocks[i]
        m = block.mixer
        hist = step.shared.history
        kept = (None, None, None) if hist is None else (hist.conv[i], hist.ssm[i], step.slots % hist.positions)
        tensors = (h, block.norm.weight, m.in_proj.weight, m.in_proj.bias, m.conv1d.weight, m.conv1d.bias,
                   m.dt_bias, m.A_log, m.D, m.norm.weight, m.out_proj.weight, m.out_proj.bias,
                   state.conv[i], state.ssm[i], step.write, *kept)
        # Every value here is the same for all layers of a model: one compilation serves them all.
        lo, hi = m.time_step_limit
        scalars = dict(eps=block.norm.variance_epsilon, gnorm_eps=m.norm.variance_epsilon,
                       group_size=m.norm.group_size, n_heads=m.num_heads, head_dim=m.head_dim,
                       n_groups=m.n_groups, state_size=m.ssm_state_size, intermediate=m.intermediate_size,
                       conv_dim=m.conv_dim, dt_min=float(lo), dt_max=float(hi),
                       residual_in_fp32=self.residual_in_fp32)
        return tensors, scalars

    def forward_layer_fixed(self, i, h, state, step, keys, ctx=None, kernel=plain):
        T = h.shape[1]
        # A prompt into an empty state takes the chunked scan (`_mixer`), not T unrolled steps.
        if not self._fusable(i, T) or (T > 1 and step.shared.from_empty):
            return self.forward_layer(i, h, state, step)
        tensors, scalars = self._fixed_args(i, h, state, step)
        return kernel(_mamba2_fixed)(*tensors, **scalars)

    def fill_propagate_fixed(self, i, h, state, step, keys, ctx=None, kernel=plain):
        if not self._fusable(i, h.shape[1]):
            return self.fill_propagate(i, h, state, step)
        tensors, scalars = self._fixed_args(i, h, state, step)
        kernel(_mamba2_fixed)(*tensors, **scalars, output=False)

    def _collect(self, ids, layers, attention_mask, aux, logits_at):
        # HF's Mamba-2 torch path (no mamba-ssm) materialises [B, chunks, L, L, heads, state] per
        # layer; the chunked scan in ssd.py computes the same as batched matmuls (tests: equal).
        if not self.v2:
            return super()._collect(ids, layers, attention_mask, aux, logits_at)
        from meestral.backbones.ssd import forward_collect

        hidden, auxes, h = forward_collect(self.model, ids, layers, attention_mask, aux)
        if logits_at is not None:
            h = h[:, logits_at]
        return hidden, auxes, self.model.lm_head(h.to(self.model.lm_head.weight.dtype))

    def train_forward(self, ids, layers=(), skip=None):
        # As `_collect`: HF's Mamba-2 torch path is too memory-hungry to train through.
        if not self.v2:
            return super().train_forward(ids, layers, skip)
        from meestral.backbones.ssd import forward_collect

        hidden, _, final = forward_collect(self.model, ids, layers, skip=skip)
        return hidden, final

    def layer_tensors(self, state, i):
        return [state.conv[i], state.ssm[i]]

    # ---- costs -----------------------------------------------------------------------------
    def layer_cost(self, i):
        block = self.blocks[i]
        m = block.mixer
        params = sum(p.numel() for p in block.parameters())
        n = m.ssm_state_size
        if self.v2:
            scan = 6.0 * m.num_heads * m.head_dim * n  # decay, input, readout per state element
            in_rows = m.conv_dim + m.num_heads
            prop = in_rows * self.hidden_size + m.conv1d.weight.numel() + 3 * m.num_heads
        else:
            scan = 6.0 * m.intermediate_size * n
            prop = (
                m.intermediate_size * self.hidden_size
                + m.conv1d.weight.numel()
                + m.x_proj.weight.numel()
                + m.dt_proj.weight.numel()
                + m.A_log.numel()
                + m.D.numel()
            )
        prop += block.norm.weight.numel()
        return LayerCost(params=params, flops=2.0 * params + scan, propagate_params=prop, propagate_flops=2.0 * prop + scan)

    def attention_flops(self, i, context):
        return 0.0  # a recurrent state costs the same at every position
