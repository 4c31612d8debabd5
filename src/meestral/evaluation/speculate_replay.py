"""What `speculate` would spend on a teacher-forced sequence, from an exact table alone.

Scoring under `speculate` emits the full model's distribution (the policy is lossless); its cost
is what greedy generation would pay, cycle by cycle (decoding/speculate.py): after the prompt pass,
a cycle at token t drafts tokens t, t+1, ... from exit point E until k drafts are made; draft i is
proposed while the exit head's confidence stays above the threshold, and accepted while it equals
the full model's top-1; the token after the accepted ones comes from the deep pass; the drafts
after the first rejection are spent work.

Unlike `verify` (verify_replay.py) no model run is needed: a draft that follows an accepted draft
was fed that draft, which is the full model's top-1; on the model's own greedy output that is the
sequence's token, so the table (built on the sequence) holds every draft's prediction and
confidence, and the drafts after a rejection are priced whatever they would have been. On the
model's own greedy continuation this is exactly the decoder's own cost (tests); on other text a
draft is priced as if its input were the sequence's token.

The controller's choices (`adaptive`) follow measured wall-clock and cannot be replayed: scoring
prices a fixed k (`draft_tokens`) from the first exit point.
"""

from __future__ import annotations

from meestral.decoding.accounting import StepLog
from meestral.decoding.speculate import draft_step_log


def replay_speculate(table, config, num_layers: int, kept=None):
    """(logs of the emitted tokens, logs of spent drafts) for one table under `speculate`."""
    L = num_layers
    kept = list(range(L)) if kept is None else list(kept)
    j = 0
    E = config.exit_points[j]
    th = config.thresholds[j]
    k = config.draft_tokens
    J = len(config.exit_points)
    shallow = tuple(i for i in kept if i <= E)
    deep = {i for i in kept if i > E}
    probe_logits = config.probe_logits
    n = table.lp.shape[0]
    conf, top = table.conf[:, j].tolist(), table.top.tolist()
    N = config.draft_vocab  # a trimmed draft head: its first N rows (0: all)
    share = N / table.vocab if N else 1.0
    beat = table.beat[:, j].tolist() if N else None

    def accepted(u):  # the draft predicting token u is the full model's top-1
        if N:
            return top[u][J] < N <= beat[u]
        return top[u][j] == top[u][J]

    logs, spent = [], []
    first = StepLog.prefill_pass(kept, table.start + 1, L)
    first.verified = True
    logs.append(first)

    def draft_log(u):  # the draft step that predicts token u
        return draft_step_log(E, shallow, table.start + u + 1, probe_logits, share)

    t = 1
    while t < n:
        kk = min(k, n - t - 1)  # near the end a cycle makes fewer drafts (as the decoder does)
        if kk == 0:  # one token left: the decoder's controller-free cycle of 0 drafts is a full step
            logs.append(StepLog(L - 1, tuple(kept), table.start + t + 1, verified=True))
            t += 1
            continue
        m, proposed = 0, True
        for i in range(kk):
            # (a trimmed draft head with a logit-reading head kind asks no confidence: threshold 0)
            proposed = proposed and (conf[t + i] > th or bool(N and probe_logits))
            if not (proposed and accepted(t + i)):
                break
            m += 1
        logs += [draft_log(t + i) for i in range(m)]
        slots = tuple((kk + 1 if i in deep else 1) if i in kept else 0 for i in range(L))
        logs.append(StepLog(L - 1, tuple(kept), table.start + t + kk + 1, slots=slots, verified=True))
        spent += [draft_log(t + i) for i in range(m, kk)]
        t += m + 1
    return logs, spent
