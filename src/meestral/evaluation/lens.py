"""DYNAMAX's view of one text: the logit lens at every layer, exit-head confidences, and how far
the hidden state moves from one layer to the next (drift). Plotted by `meestral report`."""

from __future__ import annotations

from meestral.errors import MeestralError

MAX_TOKENS = 128  # the report draws a column per token, 20 to a block: more is a page of blocks


def lens_ids(bb, text: str, max_tokens: int = MAX_TOKENS, option: str = "--lens-text") -> list[int]:
    """The token ids of `text`, refused (never cut) past `max_tokens`."""
    ids = bb.tokenizer.encode(text)
    if not text.strip():
        raise MeestralError(f"{option} is empty: give a sentence to follow through the layers")
    if len(ids) > max_tokens:
        raise MeestralError(f"{option} is {len(ids):,} tokens long, but the logit lens shows at most {max_tokens} "
                            "(a column each in the report's figure): give a shorter text")
    return ids


def logit_lens(bb, heads, text: str, max_tokens: int = MAX_TOKENS) -> dict:
    import torch  # here: the command line reads MAX_TOKENS without loading torch

    with torch.no_grad():
        return _lens(bb, heads, lens_ids(bb, text, max_tokens))


def _lens(bb, heads, ids) -> dict:
    import torch

    x = torch.tensor([ids], device=bb.device)
    L = bb.num_layers
    hidden, aux, final = bb.collect(x, range(L - 1), aux=heads is not None and heads.features == "hidden+aux")
    hs = [hidden[l][0] for l in range(L - 1)]
    tops = [bb.logits(h).argmax(-1) for h in hs] + [final[0].argmax(-1)]
    last = tops[-1]
    tok = bb.tokenizer
    out = {
        "tokens": [tok.decode([i]) for i in ids],
        "layers": list(range(L)),
        "top_tokens": [[tok.decode([int(i)]) for i in t] for t in tops],
        "agree_final": [(t == last).tolist() for t in tops],
        "confidence": {},
    }
    if heads is not None:
        emb = bb.embed(x)[0]
        for j, p in enumerate(heads.exit_points):
            h = hs[p]
            a = aux[p][0] if aux else None
            prev = hs[p - 1] if p > 0 else emb
            lg = bb.logits(h) if heads.needs_logits else None
            out["confidence"][str(p)] = heads.confidence(j, h, a, prev, lg).float().tolist()
        out["head_kind"] = heads.kind
    # Drift: the last entry of HF's hidden states is normed, so compare raw block outputs only.
    cos = [float(torch.cosine_similarity(hs[l].float(), hs[l - 1].float(), dim=-1).mean()) for l in range(1, L - 1)]
    norm = [float(h.float().norm(dim=-1).mean()) for h in hs[1:]]
    out["drift"] = {"layers": list(range(1, L - 1)), "cosine": cos, "norm": norm}
    return out
