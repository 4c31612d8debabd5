"""Block-by-block execution through the adapters equals the HF full forward."""

import pytest
import torch

from conftest import TINY


def run_blocks(bb, ids, pad=None, chunks=None):
    """Prefill `ids` [B, T] through the adapter, in the given chunk sizes; return final logits."""
    B, T = ids.shape
    pad = torch.zeros(B, dtype=torch.long) if pad is None else pad
    state = bb.new_state(B, T)
    chunks = chunks or [T]
    outs, start = [], 0
    for n in chunks:
        step = bb.make_step(start, n, pad)
        h = bb.embed(ids[:, start:start + n])
        for i in range(bb.num_layers):
            h, _ = bb.forward_layer(i, h, state, step)
        outs.append(bb.logits(h))
        start += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("shape", TINY)
def test_prefill_equals_hf(tiny, shape):
    bb = tiny(shape)
    ids = torch.randint(3, bb.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    ref = bb.full_logits(ids)
    got, _ = run_blocks(bb, ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", TINY)
def test_cached_decode_equals_hf(tiny, shape):
    """Prefill 5 tokens, then one token at a time, then a 4-token chunk: all equal the full forward."""
    bb = tiny(shape)
    ids = torch.randint(3, bb.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    ref = bb.full_logits(ids)
    got, _ = run_blocks(bb, ids, chunks=[5, 1, 1, 1, 1, 1, 4])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", TINY)
def test_left_padding_matches_unpadded(tiny, shape):
    bb = tiny(shape)
    g = torch.Generator().manual_seed(3)
    short = torch.randint(3, bb.vocab_size, (1, 6), generator=g)
    full = torch.randint(3, bb.vocab_size, (1, 9), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), full], 0)
    got, _ = run_blocks(bb, ids, pad=torch.tensor([3, 0]))
    torch.testing.assert_close(got[0, 3:9], bb.full_logits(short)[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, :9], bb.full_logits(full)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", ["mistral", "llama", "mamba2", "mamba"])
def test_collect_matches_blockwise(tiny, shape):
    """The whole-sequence feature path (HF forward + hooks) gives what forward_layer gives."""
    bb = tiny(shape)
    ids = torch.randint(3, bb.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    layers = [0, 2, bb.num_layers - 2]
    hid, aux, logits = bb.collect(ids, layers, aux=bb.aux_dim() > 0)
    state = bb.new_state(2, 11)
    step = bb.make_step(0, 11, torch.zeros(2, dtype=torch.long))
    h = bb.embed(ids)
    for i in range(bb.num_layers):
        h, a = bb.forward_layer(i, h, state, step)
        if i in layers:
            torch.testing.assert_close(hid[i], h, atol=2e-5, rtol=1e-4)
            if bb.aux_dim():
                torch.testing.assert_close(aux[i], a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits, bb.logits(h), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        bb.collect(ids, [bb.num_layers - 1])
