"""Mamba-2 against its own equations: a plain token-by-token recurrence in float64, written here
from the definition (mamba-ssm's `Mamba2` block), is the referee between HF's forward, our chunked
scan (`collect`) and our stepped decoder path, with and without left padding.

Why a third party: when transformers changes its Mamba-2 (5.25 regenerated the file; before 5.24
its gated norm ignored `n_groups`), a test that only compares us with HF cannot say which side
moved. Each row's reference runs on its real tokens alone: left padding must be invisible.
"""

import pytest
import torch
import torch.nn.functional as F

from meestral.backbones.base import Backbone


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_block(block, h, residual_in_fp32=True):
    """One Mamba-2 block on one row h [T, d] from a zero state, in float64. Returns (block output
    [T, d], conv window [conv_dim, K] after the row, SSM state [H, P, N] after the row)."""
    m = block.mixer
    d64 = {n: p.detach().double() for n, p in block.named_parameters()}
    I, H, P, G, N = m.intermediate_size, m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
    K, cd = m.conv1d.kernel_size[0], m.conv_dim
    T = h.shape[0]
    x_in = h.double()
    u = _rms(x_in, d64["norm.weight"], block.norm.variance_epsilon)
    proj = u @ d64["mixer.in_proj.weight"].T
    if "mixer.in_proj.bias" in d64:
        proj = proj + d64["mixer.in_proj.bias"]
    z, xbc, dt = proj[:, :I], proj[:, I:I + cd], proj[:, I + cd:]
    assert dt.shape[1] == H  # no extra MLP columns in these models
    w_conv = d64["mixer.conv1d.weight"][:, 0, :]  # [cd, K]
    b_conv = d64.get("mixer.conv1d.bias")
    A = -torch.exp(d64["mixer.A_log"])
    lo, hi = m.time_step_limit
    window = torch.zeros(cd, K, dtype=torch.float64)
    S = torch.zeros(H, P, N, dtype=torch.float64)
    out = []
    for t in range(T):
        window = torch.cat([window[:, 1:], xbc[t][:, None]], 1)  # the causal conv's last K inputs
        c = (window * w_conv).sum(-1)
        if b_conv is not None:
            c = c + b_conv
        c = F.silu(c)
        x = c[:I].view(H, P)
        B = c[I:I + G * N].view(G, N)
        C = c[I + G * N:].view(G, N)
        delta = F.softplus(dt[t] + d64["mixer.dt_bias"]).clamp(lo, hi)  # [H]
        y = torch.empty(H, P, dtype=torch.float64)
        for head in range(H):
            g = head // (H // G)  # heads share their group's B and C
            S[head] = torch.exp(delta[head] * A[head]) * S[head] + delta[head] * torch.outer(x[head], B[g])
            y[head] = S[head] @ C[g] + d64["mixer.D"][head] * x[head]
        v = y.reshape(I) * F.silu(z[t])  # gated RMS norm, one norm per group of I / G channels
        v = v.view(G, I // G)
        v = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + m.norm.variance_epsilon)).reshape(I)
        v = d64["mixer.norm.weight"] * v
        o = v @ d64["mixer.out_proj.weight"].T
        if "mixer.out_proj.bias" in d64:
            o = o + d64["mixer.out_proj.bias"]
        out.append(x_in[t] + o)
    return torch.stack(out), window, S


def reference(bb, ids_row):
    """Every block's output [L][T, d] and state after the row, by the recurrence above."""
    h = bb.embed(torch.tensor([ids_row]))[0]
    outs, convs, ssms = [], [], []
    for block in bb.blocks:
        h, conv, ssm = reference_block(block, h, bb.residual_in_fp32)
        outs.append(h)
        convs.append(conv)
        ssms.append(ssm)
    return outs, convs, ssms


def close(got, ref, what, tol=2e-5):
    """On the reference's own scale: float32 against float64."""
    got, ref = got.double(), ref.double()
    err = float((got - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    assert err <= tol * scale, f"{what}: max |difference| {err:.3g} against the float64 recurrence (scale {scale:.3g})"


def left_padded(rows, pad_id=0):
    P = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_all_paths(bb, rows, layers):
    refs = [reference(bb, r) for r in rows]
    ids, mask = left_padded(rows)
    P = ids.shape[1]
    # 1. HF's own forward, one unpadded row at a time and as a left-padded batch.
    with torch.no_grad():
        for b, r in enumerate(rows):
            hs = bb.block_outputs(bb.model(torch.tensor([r]), output_hidden_states=True).hidden_states, layers)
            for l in layers:
                close(hs[l][0], refs[b][0][l], f"HF forward, row {b}, block {l}")
        hs = bb.block_outputs(bb.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states, layers)
        for b, r in enumerate(rows):
            for l in layers:
                close(hs[l][b, P - len(r):], refs[b][0][l], f"HF forward, left-padded row {b}, block {l}")
    # 2. Our whole-sequence pass (the chunked scan), padded and not.
    for b, r in enumerate(rows):
        got = bb.collect(torch.tensor([r]), layers)[0]
        for l in layers:
            close(got[l][0], refs[b][0][l], f"collect, row {b}, block {l}")
    got = bb.collect(ids, layers, attention_mask=mask)[0]
    for b, r in enumerate(rows):
        for l in layers:
            close(got[l][b, P - len(r):], refs[b][0][l], f"collect, left-padded row {b}, block {l}")
    # 3. Our decoder's stepped recurrence over the left-padded batch, one slot at a time, and the
    #    states it keeps afterwards.
    pad = torch.tensor([P - len(r) for r in rows])
    state = bb.new_state(len(rows), P)
    outs = {l: [] for l in range(bb.num_layers)}
    with torch.no_grad():
        for t in range(P):
            step = bb.make_step(t, 1, pad)
            h = bb.embed(ids[:, t:t + 1])
            for i in range(bb.num_layers):
                h, _ = bb.forward_layer(i, h, state, step)
                outs[i].append(h[:, 0])
    for b, r in enumerate(rows):
        for l in range(bb.num_layers):
            close(torch.stack(outs[l], 1)[b, P - len(r):], refs[b][0][l], f"stepping, row {b}, block {l}")
            close(state.conv[l][b], refs[b][1][l], f"conv window after the row, row {b}, block {l}")
            close(state.ssm[l][b], refs[b][2][l], f"SSM state after the row, row {b}, block {l}")


ROWS = [list(range(3, 43)), [5, 9, 2, 77, 31, 8, 120, 64, 17, 200, 4], [11, 12]]


def test_tiny_mamba2_equals_the_recurrence(tiny):
    """Two groups (the gated norm's grouping matters), chunks of 16 crossed by a 40-token row, a
    2-token row shorter than the conv kernel; padding of 29 and 38 slots."""
    bb = tiny("mamba2")
    assert bb.blocks[0].mixer.n_groups == 2
    check_all_paths(bb, ROWS, [0, 2, bb.num_layers - 2])


@pytest.mark.slow
def test_mamba2_smol_equals_the_recurrence():
    from meestral.backbones.loading import load_backbone

    bb = load_backbone("mamba2-smol")
    rows = [[1, 504, 3458, 282, 2114, 30, 260, 1178, 314, 1345, 28, 418, 1029, 314, 260, 3417, 30],
            [1, 1670, 314, 1345], [1, 30]]
    check_all_paths(bb, rows, [0, 11, bb.num_layers - 2])


def test_block_outputs_reads_either_layout(tiny):
    """HF's hidden-state tuple is read by what entry 0 holds, not by the release's number."""
    for shape in ("mistral", "mamba2", "mamba"):
        bb = tiny(shape)
        ids = torch.randint(3, bb.vocab_size, (1, 6))
        hs = bb.model(ids, output_hidden_states=True).hidden_states
        got = bb.block_outputs(hs, [0])[0]
        state = bb.new_state(1, 6)
        h, _ = bb.forward_layer(0, bb.embed(ids), state, bb.make_step(0, 6, torch.zeros(1, dtype=torch.long)))
        torch.testing.assert_close(got, h.to(got.dtype), atol=1e-5, rtol=1e-5, msg=shape)
        with pytest.raises(ValueError):
            bb.block_outputs(hs, [bb.num_layers - 1])
    assert Backbone.block_outputs is type(bb).block_outputs  # one function for every adapter
