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

The controller (`adaptive`) follows measured wall-clock in generation, which no replay can repeat:
scoring runs it on each step's weight-byte cost instead (what bounds batch-1 decoding on a GPU), so
an adaptive row is priced as the controller would run on a clock of weight bytes, tested equal to a
decoder whose controller is fed the same clock. A fixed k drafts from the one exit point.
"""

from __future__ import annotations

from meestral.decoding.accounting import StepLog
from meestral.decoding.speculate import draft_step_log


def replay_speculate(table, config, num_layers: int, kept=None, bb=None):
    """(logs of the emitted tokens, logs of spent drafts) for one table under `speculate`. With
    `config.adaptive` (and `bb`, for the weight-byte costs) the controller picks each step, fed each
    step's weight-byte cost as its clock (SpeculatePolicy.clock = "bytes")."""
    from meestral.decoding.speculate import cycle_cost, draft_head_share
    from meestral.decoding.speculation_control import Choice, SpeculationController

    L = num_layers
    kept = list(range(L)) if kept is None else list(kept)
    points, J = config.exit_points, len(config.exit_points)
    k_max = config.draft_tokens
    probe_logits = config.probe_logits
    n = table.lp.shape[0]
    conf, top = table.conf.tolist(), table.top.tolist()
    N = config.draft_vocab  # a trimmed draft head: its first N rows (0: all)
    share = draft_head_share(N, table.vocab)
    beat = table.beat.tolist() if N else None
    control = None
    if config.adaptive and bb is not None:
        prior = {}

        def cost(j, k):
            if (j, k) not in prior:
                prior[j, k] = cycle_cost(bb, points[j], k, kept, N)
            return prior[j, k]

        control = SpeculationController(list(range(J)), k_max, cost)

    def accepted(u, j):  # the draft from exit point j predicting token u is the full model's top-1
        if N:
            return top[u][J] < N <= beat[u][j]
        return top[u][j] == top[u][J]

    # per exit point: the blocks a draft runs, and those the deep pass runs
    split = [(tuple(i for i in kept if i <= E), {i for i in kept if i > E}) for E in points]
    logs, spent = [], []
    first = StepLog.prefill_pass(kept, table.start + 1, L)
    first.verified = True
    logs.append(first)
    t = 1
    while t < n:
        c = control.choose() if control is not None else Choice(0, k_max)
        j = c.j
        kk = max(0, min(c.k, n - t - 1))  # near the end a cycle makes fewer drafts (as the decoder does)
        if kk == 0:  # a plain full-depth step (the controller's fallback, or one token left)
            logs.append(StepLog(L - 1, tuple(kept), table.start + t + 1, verified=True))
            if control is not None:
                control.observe(Choice(j, 0, c.probe), 1.0)
            t += 1
            continue
        E, th = points[j], config.thresholds[j]
        shallow, deep = split[j]
        m, proposed = 0, True
        for i in range(kk):
            # (a trimmed draft head with a logit-reading head kind asks no confidence: threshold 0)
            proposed = proposed and (conf[t + i][j] > th or bool(N and probe_logits))
            if not (proposed and accepted(t + i, j)):
                break
            m += 1
        logs += [draft_step_log(E, shallow, table.start + t + i + 1, probe_logits, share) for i in range(m)]
        slots = tuple((kk + 1 if i in deep else 1) if i in kept else 0 for i in range(L))
        logs.append(StepLog(L - 1, tuple(kept), table.start + t + kk + 1, slots=slots, verified=True))
        spent += [draft_step_log(E, shallow, table.start + t + i + 1, probe_logits, share) for i in range(m, kk)]
        if control is not None:
            control.observe(Choice(j, kk, c.probe), cost(j, kk), m, m < kk)
        t += m + 1
    return logs, spent
