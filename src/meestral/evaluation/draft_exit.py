"""`--exits auto` for the `speculate` policy: which exit point to draft from, chosen by a short
calibration on held-out text.

A draft from exit point E is accepted when the logit lens at E (the shared final norm + LM head)
ranks first the token the full model ranks first. On held-out text, teacher-forced, every position
gives one such match or mismatch per layer (evaluation.oracle.layer_predictions, one forward). A
cycle starting at position i with k drafts emits 1 + (the number of consecutive matches from i,
at most k) tokens; averaging that over every start position measures the expected tokens per cycle
with the matches' real correlation (runs of easy tokens), not the independent-draft formula. Its
cost is `decoding.speculate.cycle_cost` (weight bytes, in full-depth steps: what bounds batch-1
decoding on a GPU). The exit point and k with the most tokens per unit of cost win.

Teacher forcing on held-out text is a proxy for the model's own continuations (which it agrees
with more readily): the choice is a starting point, and under `--draft-tokens auto` the controller
still measures acceptance and step times as generation runs, falling back to full depth where
drafting does not pay.
"""

from __future__ import annotations

import numpy as np

from meestral.errors import MeestralError


def candidate_layers(num_layers: int) -> list[int]:
    """Exit points worth a try: from an eighth of the depth to three quarters (shallower drafts are
    rarely accepted; deeper ones save too little), every second layer, at most a dozen."""
    L = num_layers
    lo, hi = max(1, L // 8), max(1, min(L - 2, (3 * L) // 4))
    step = max(1, -(-(hi - lo + 1) // 12))
    layers = list(range(lo, hi + 1, step))
    return layers or [max(0, L - 2)]


def run_lengths(match: np.ndarray, row: np.ndarray) -> np.ndarray:
    """For every position, how many consecutive matches start there (within its own row)."""
    n = len(match)
    runs = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        if match[i]:
            same_row = i + 1 < n and row[i + 1] == row[i]
            runs[i] = 1 + (runs[i + 1] if same_row else 0)
    return runs


def expected_cycle_tokens(runs: np.ndarray, k: int) -> float:
    """Mean tokens a cycle of k drafts emits: the accepted drafts, then the deep pass's token."""
    return float(np.mean(1 + np.minimum(runs, k)))


def choose_draft_exit(bb, rows, layers=None, max_k: int = 6, draft_vocab: int = 0) -> dict:
    """The exit point (and k) with the highest expected speed-up by weight bytes on `rows` (a
    [B, T] tensor of held-out token ids). Returns {'exit', 'k', 'speedup', 'tokens', 'table'}, the
    table one entry per candidate layer: its agreement with the final layer, and its best k,
    tokens per cycle and speed-up. `draft_vocab` N: drafts from the LM head's first N rows (a draft
    is then the full model's top-1 only where that token is among them and no other of them beats it)."""
    from meestral.decoding.speculate import cycle_cost
    from meestral.evaluation.oracle import layer_predictions

    L = bb.num_layers
    layers = sorted(set(layers)) if layers else candidate_layers(L)
    if not all(0 <= e < L - 1 for e in layers):
        raise MeestralError(f"draft exit candidates must lie in [0, {L - 2}] for a {L}-layer backbone, got {layers}")
    if not 1 <= max_k:
        raise MeestralError(f"max_k must be at least 1, got {max_k}")
    preds = layer_predictions(bb, rows, layers, draft_vocab=draft_vocab or None)
    table = []
    for c, e in enumerate(layers):
        match = preds.layer_argmax[:, c] == preds.final_argmax
        runs = run_lengths(match, preds.row)
        best = max((expected_cycle_tokens(runs, k) / cycle_cost(bb, e, k, draft_vocab=draft_vocab), k)
                   for k in range(1, max_k + 1))
        table.append({"exit": e, "agreement": float(match.mean()), "k": best[1],
                      "tokens": expected_cycle_tokens(runs, best[1]), "speedup": best[0]})
    pick = max(table, key=lambda r: r["speedup"])
    return {**pick, "positions": int(len(preds.final_argmax)), "table": table}


def calibrated_exit(bb, text: str = "embedded", tokens: int = 512, seq_len: int = 256, max_k: int = 6,
                    draft_vocab: int = 0, log=None) -> int:
    """The exit point `choose_draft_exit` picks on `tokens` held-out tokens of `text` (a source
    spec: embedded, a file or folder), said in one line through `log` (e.g. print to stderr)."""
    from meestral.data import heldout_rows

    rows = heldout_rows(text, bb.tokenizer, tokens, seq_len)
    out = choose_draft_exit(bb, rows, max_k=max_k, draft_vocab=draft_vocab)
    if log is not None:
        pays = "expected to pay" if out["speedup"] > 1 else "not expected to pay: the controller falls back to full depth"
        log(f"--exits auto: exit point {out['exit']} (agreement {out['agreement']:.2f} with the last layer, "
            f"{out['tokens']:.2f} tokens per cycle at k={out['k']}, {out['speedup']:.2f}x full depth by weight "
            f"bytes: {pays}) from {out['positions']:,} held-out tokens of {text}")
    return out["exit"]
