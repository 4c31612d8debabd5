"""Oracle analysis: what the logit lens predicts at each exit point, how often that agrees with
the final layer, and the oracle exit, which bounds every exit policy.

The oracle exit of a token is the first exit point from which the top-1 token (final norm + LM
head on that layer's hidden state) equals the full model's and stays equal at every later exit
point; tokens with no such exit point run to full depth (layer L-1). "Stays equal" matters: a
token that matches at layer 3, differs at 5 and matches again at 7 has oracle exit 7, because a
policy that trusted layer 3 could not know that layer 5 disagrees. Without the last condition the
"bound" would credit exits whose agreement is a coincidence of one layer.

The bound is in layers run, not wall-clock: it ignores probe costs (an LM-head probe can cost more
than the blocks it skips: SmolLM2's tied LM head weighs as much as ~8 of its blocks) and state
upkeep for skipped layers.

Where the bound goes: `by_confidence` splits tokens by the full model's own top-1 probability.
A token the last layer is unsure of (a near-tie among its candidates) needs nearly every layer,
since an earlier layer must break the same tie the same way and keep it; on held-out text most
tokens of a small model are such tokens, so they, not the confident ones, hold the bound down.

Pure functions work on numpy arrays; `layer_predictions` and `oracle_gather` run the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meestral.errors import MeestralError


@dataclass
class LayerPredictions:
    """Logit-lens predictions on valid (non-padding) positions, in row-major order."""

    layers: list[int]  # exit points, in depth order
    layer_argmax: np.ndarray  # [n, n_layers] top-1 token at each exit point
    final_argmax: np.ndarray  # [n] the full model's top-1
    max_prob: np.ndarray  # [n, n_layers] softmax max probability (the `softmax` confidence measure)
    row: np.ndarray  # [n] the sequence each token belongs to (a `groups` for calibration)
    position: np.ndarray  # [n] position within its sequence
    topk: int | None = None
    in_topk: np.ndarray | None = None  # [n, n_layers] final top-1 within the layer's top-k
    final_prob: np.ndarray | None = None  # [n] the full model's top-1 probability (its confidence)

    @property
    def tokens(self) -> int:
        return len(self.final_argmax)


def _check_layers(layers, num_layers: int) -> list[int]:
    layers = [int(l) for l in layers]
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] > num_layers - 2:
        raise MeestralError(
            f"oracle: exit points must be sorted, unique and within [0, {num_layers - 2}] "
            f"(the last layer is the reference), got {layers}"
        )
    return layers


@torch.no_grad()
def layer_predictions(bb, ids: torch.Tensor, layers, lengths=None, chunk: int = 256,
                      topk: int | None = None, draft_vocab: int | None = None) -> LayerPredictions:
    """Top-1 of the logit lens at each exit point for a right-padded batch `ids` [B, T].

    One HF forward (`bb.collect`); the LM head then runs on `chunk` positions at a time so memory
    stays bounded with a large vocabulary. `lengths` [B] masks the padding (default: no padding);
    right padding cannot change earlier positions of a causal model, so no attention mask is
    needed. With `topk`, also records whether the final top-1 is within each layer's top-k.
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise MeestralError("oracle: ids must be a [batch, length] tensor of token ids")
    layers = _check_layers(layers, bb.num_layers)
    B, T = ids.shape
    if lengths is None:
        lengths = torch.full((B,), T)
    lengths = torch.as_tensor(lengths).reshape(-1).to("cpu", torch.long)
    if lengths.shape[0] != B or (lengths < 0).any() or (lengths > T).any():
        raise MeestralError(f"oracle: lengths must give one value in [0, {T}] per row of ids ({B} rows)")
    if topk is not None and not 1 <= int(topk) <= bb.vocab_size:
        raise MeestralError(f"oracle: topk must lie in [1, {bb.vocab_size}], got {topk}")
    if chunk < 1:
        raise MeestralError(f"oracle: chunk must be a positive number of positions, got {chunk}")

    valid = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    hidden, _, logits = bb.collect(ids.to(bb.device), layers)
    valid_dev = valid.to(logits.device)
    final = logits.argmax(-1)[valid_dev]  # [n]
    # row by row: a float32 softmax over [B, T, V] at once would double the largest tensor here
    final_prob = torch.cat([torch.softmax(r.float(), -1).amax(-1)[v] for r, v in zip(logits, valid_dev)]).cpu()
    del logits
    n = final.shape[0]
    argmax = torch.empty(n, len(layers), dtype=torch.long)
    maxp = torch.empty(n, len(layers), dtype=torch.float32)
    in_topk = torch.empty(n, len(layers), dtype=torch.bool) if topk else None
    for c, l in enumerate(layers):
        h = hidden[l][valid_dev]  # [n, d]
        for s in range(0, n, chunk):
            lg = bb.logits(h[s : s + chunk]).float()
            top, arg = lg.max(-1)
            if draft_vocab:  # the top-1 among the LM head's first rows only (speculate's trimmed draft head)
                arg = lg[:, :draft_vocab].argmax(-1)
            argmax[s : s + chunk, c] = arg.cpu()
            maxp[s : s + chunk, c] = torch.exp(top - torch.logsumexp(lg, -1)).cpu()
            if topk:
                cand = lg.topk(int(topk), -1).indices
                in_topk[s : s + chunk, c] = (cand == final[s : s + chunk, None]).any(-1).cpu()
    rows, pos = torch.nonzero(valid, as_tuple=True)  # row-major, same order as boolean indexing
    return LayerPredictions(
        layers=layers,
        layer_argmax=argmax.numpy(),
        final_argmax=final.cpu().numpy(),
        max_prob=maxp.numpy(),
        row=rows.numpy(),
        position=pos.numpy(),
        topk=int(topk) if topk else None,
        in_topk=None if in_topk is None else in_topk.numpy(),
        final_prob=final_prob.numpy(),
    )


# ---- pure functions ---------------------------------------------------------------------------------
def _check_arrays(layer_argmax, final_argmax, layers=None):
    la, fa = np.asarray(layer_argmax), np.asarray(final_argmax)
    if la.ndim != 2 or fa.ndim != 1 or la.shape[0] != fa.shape[0]:
        raise MeestralError(
            f"oracle: layer_argmax must be [n, n_layers] and final_argmax [n], got {la.shape} and {fa.shape}"
        )
    if layers is not None and la.shape[1] != len(layers):
        raise MeestralError(f"oracle: {la.shape[1]} columns of predictions for {len(layers)} layers; pass one per column")
    return la, fa


def agreement_by_layer(layer_argmax, final_argmax) -> np.ndarray:
    """Per exit point, the fraction of tokens whose top-1 equals the final layer's. [n_layers]"""
    la, fa = _check_arrays(layer_argmax, final_argmax)
    if la.shape[0] == 0:
        raise MeestralError("oracle: no tokens to measure; give some non-empty text")
    return (la == fa[:, None]).mean(axis=0)


def exit_agreement(layer_argmax, final_argmax) -> np.ndarray:
    """[n, n_layers+1] bool: exiting at each exit point emits the final token (last column: full
    depth, always True) — the `agree` input of `calibration.calibrate`."""
    la, fa = _check_arrays(layer_argmax, final_argmax)
    return np.concatenate([la == fa[:, None], np.ones((la.shape[0], 1), bool)], axis=1)


def oracle_from_match(match, layers, num_layers: int) -> np.ndarray:
    """Oracle exit layer per token from a [n, n_layers] bool 'matches the final' table: the first
    listed layer from which every later listed layer matches too; L-1 when none."""
    match = np.asarray(match, bool)
    layers = _check_layers(layers, num_layers)
    if match.ndim != 2 or match.shape[1] != len(layers):
        raise MeestralError(f"oracle: match must be [n, {len(layers)}], got {match.shape}")
    # stays[:, j]: match at j and at every later exit point (an AND over the suffix)
    stays = np.flip(np.logical_and.accumulate(np.flip(match, 1), axis=1), 1)
    exits = np.asarray(layers + [num_layers - 1])
    first = np.where(stays.any(axis=1), stays.argmax(axis=1), len(layers))
    return exits[first]


def oracle_exits(layer_argmax, final_argmax, layers, num_layers: int) -> np.ndarray:
    """Per token, the oracle exit layer (top-1 equals the final's from there on); L-1 when none. [n]"""
    la, fa = _check_arrays(layer_argmax, final_argmax, layers)
    return oracle_from_match(la == fa[:, None], layers, num_layers)


def _exit_stats(exits: np.ndarray, layers, num_layers: int) -> dict:
    run = exits + 1.0
    hist = {int(l): int((exits == l).sum()) for l in list(layers) + [num_layers - 1]}
    return {
        "exit_histogram": hist,
        "mean_exit_layer": float(exits.mean()),
        "mean_layers_run": float(run.mean()),
        "layer_fraction": float(run.mean() / num_layers),
        "bound_speedup_layers": float(num_layers / run.mean()),
    }


CONFIDENCE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def by_confidence(exits, final_prob, num_layers: int, edges=CONFIDENCE_EDGES) -> list[dict]:
    """The oracle split by the full model's top-1 probability, one bin per pair of `edges` (the
    last bin includes its upper edge): the bin's share of tokens, the mean layers its tokens run,
    the share that needs every layer, and the bound were every token like them."""
    exits, p = np.asarray(exits), np.asarray(final_prob, dtype=np.float64)
    if p.shape != exits.shape:
        raise MeestralError(f"oracle: final_prob must give one probability per token ({exits.shape[0]}), got {p.shape}")
    out = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        m = (p >= lo) & ((p <= hi) if i == len(edges) - 2 else (p < hi))
        run = exits[m] + 1.0
        out.append({"final_prob": [float(lo), float(hi)], "share": float(m.mean()) if m.size else 0.0,
                    "tokens": int(m.sum()),
                    "mean_layers_run": float(run.mean()) if m.any() else None,
                    "full_depth_share": float((exits[m] == num_layers - 1).mean()) if m.any() else None,
                    "bound_speedup_layers": float(num_layers / run.mean()) if m.any() else None})
    return out


def oracle_summary(layer_argmax, final_argmax, layers, num_layers: int, in_topk=None, topk: int | None = None,
                   final_prob=None) -> dict:
    """Per-layer agreement, the oracle exit histogram and the bound it implies, in layers run.

    `bound_speedup_layers` = L / mean layers run: an upper bound on layer savings for strict
    (token-identical) exits at these exit points, not a wall-clock speed-up. With `in_topk`
    ([n, n_layers] from `layer_predictions(topk=k)`), adds the same for the relaxed top-k rule.
    """
    la, fa = _check_arrays(layer_argmax, final_argmax, layers)
    layers = _check_layers(layers, num_layers)
    if la.shape[0] == 0:
        raise MeestralError("oracle: no tokens to summarise; give some non-empty text")
    agree = agreement_by_layer(la, fa)
    out = {
        "layers": layers,
        "num_layers": int(num_layers),
        "tokens": int(la.shape[0]),
        "agreement": {l: float(a) for l, a in zip(layers, agree)},
    }
    exits = oracle_exits(la, fa, layers, num_layers)
    out.update(_exit_stats(exits, layers, num_layers))
    if final_prob is not None:
        out["by_confidence"] = by_confidence(exits, final_prob, num_layers)
    if in_topk is not None:
        it = np.asarray(in_topk, bool)
        if it.shape != la.shape:
            raise MeestralError(f"oracle: in_topk has shape {it.shape}, predictions {la.shape}; pass the same gather's")
        out["topk"] = {"k": topk, "agreement": {l: float(a) for l, a in zip(layers, it.mean(axis=0))}}
        out["topk"].update(_exit_stats(oracle_from_match(it, layers, num_layers), layers, num_layers))
    return out


# ---- the gatherer -------------------------------------------------------------------------------------
def _sequences(items, tokenizer, seq_len: int) -> list[list[int]]:
    """Texts or token-id sequences (lists, 1-D tensors, rows of 2-D tensors) cut into windows of
    at most seq_len tokens."""
    if isinstance(items, (str, torch.Tensor)) and not (isinstance(items, torch.Tensor) and items.ndim == 2):
        items = [items]
    seqs = []
    for item in items:
        if isinstance(item, str):
            toks = [list(tokenizer.encode(item, add_bos=True))]
        elif isinstance(item, torch.Tensor) and item.ndim == 2:
            toks = item.tolist()
        elif isinstance(item, torch.Tensor) and item.ndim == 1:
            toks = [item.tolist()]
        elif isinstance(item, (list, tuple, np.ndarray)):
            toks = [[int(t) for t in item]]
        else:
            raise MeestralError(f"oracle: cannot read {type(item).__name__} as text; give strings or token id lists")
        for t in toks:
            seqs += [t[s : s + seq_len] for s in range(0, len(t), seq_len)]
    return seqs


def oracle_gather(bb, texts_or_ids, layers, seq_len: int = 512, batch: int = 8, topk: int | None = None,
                  chunk: int = 256, progress: bool = True) -> LayerPredictions:
    """`layer_predictions` over held-out texts or token ids, `batch` sequences per forward.

    Texts are tokenised with the backbone's tokenizer (BOS first), and every sequence longer than
    `seq_len` is cut into windows. `row` in the result numbers the windows across batches, so it
    serves as `groups` for sequence-level calibration.
    """
    from tqdm.auto import tqdm

    from meestral.data import right_padded

    if seq_len < 1 or batch < 1:
        raise MeestralError(f"oracle: seq_len and batch must be positive, got {seq_len} and {batch}")
    layers = _check_layers(layers, bb.num_layers)
    seqs = [s for s in _sequences(texts_or_ids, bb.tokenizer, seq_len) if s]
    if not seqs:
        raise MeestralError("oracle: no tokens to analyse; give at least one non-empty text")
    parts = []
    starts = range(0, len(seqs), batch)
    for s in tqdm(starts, desc="oracle", unit="batch", disable=not progress):
        ids, lengths = right_padded(seqs[s : s + batch])
        p = layer_predictions(bb, ids, layers, lengths=lengths, chunk=chunk, topk=topk)
        p.row = p.row + s
        parts.append(p)
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return LayerPredictions(layers=layers, layer_argmax=cat("layer_argmax"), final_argmax=cat("final_argmax"),
                            max_prob=cat("max_prob"), row=cat("row"), position=cat("position"), topk=topk,
                            in_topk=cat("in_topk") if topk else None, final_prob=cat("final_prob"))


def oracle_report(bb, texts_or_ids, layers, seq_len: int = 512, batch: int = 8, topk: int | None = None,
                  chunk: int = 256, progress: bool = True) -> dict:
    """Gather over held-out text and summarise: `oracle_summary` plus the backbone's name."""
    p = oracle_gather(bb, texts_or_ids, layers, seq_len=seq_len, batch=batch, topk=topk, chunk=chunk,
                      progress=progress)
    out = {"backbone": bb.name}
    out.update(oracle_summary(p.layer_argmax, p.final_argmax, p.layers, bb.num_layers, in_topk=p.in_topk, topk=topk,
                              final_prob=p.final_prob))
    return out
