"""`verify` on a scored sequence, charged as greedy generation would pay for it.

Teacher forcing feeds the targets whatever the drafts were, so a scoring pass by itself never
rolls anything back. Generation does: under `verify` every token that leaves early is a *draft*;
the next deep pass compares it with the full model's top-1 at its position, and at the first
disagreement the output is cut there, the full model's token is emitted instead (charged with that
deep pass) and everything spent on the rejected draft and on the drafts made after it is lost.

`replay_verify` runs that schedule over a `Table` (scoring.py), step for step as the decoder's
`VerifyPolicy` (decoding/verify.py) runs it at batch 1 with greedy acceptance, each step's log made
by the decoder's own schedule (decoding/schedule.py):

- along the sequence, row i's step leaves at the exit rule's exit point (or deep: unsure, or a
  full backlog); a draft is accepted iff its top-1 equals the full model's (the table has both);
- a rejected draft starts a *branch*: generation feeds the wrong token and keeps drafting until a
  deep pass (a step that does not exit, a full backlog, or the end of the output: the length
  limit or an end-of-sequence draft). Those tokens are not in the sequence, so their exit
  decisions come from `OffSequence`, which feeds them through the decoder's own step (full depth,
  exact states: what catch-up gives the decoder) and remembers every row it made;
- the branch's deep pass rejects the draft: its log goes to the corrected token; the draft's
  log and the branch drafts' logs are `discarded`, as the decoder's are. Then the backlog is what
  the decoder leaves: empty where states can be cut (K/V), or the accepted tokens since the
  last verified deep pass, to be replayed from a snapshot (recurrent states);
- when the output is complete with drafts still waiting, one forced deep pass verifies them
  (the decoder's flush); its work is discarded too (it emits nothing).

The logs are the decoder's `StepLog`s, priced by accounting.token_stats: one cost path.
"""

from __future__ import annotations

import torch

from meestral.decoding.accounting import StepLog
from meestral.decoding.config import ExitConfig
from meestral.decoding.engine import EagerEngine
from meestral.decoding.exit_rule import first_exit
from meestral.decoding.policy import Batch
from meestral.decoding.schedule import BacklogSchedule, probes_asked
from meestral.decoding.slot_policies import CopyPolicy


class OffSequence:
    """Exit-point rows for tokens a request's sequence does not hold.

    `row(upto, path)`: the state holds the request's first `upto` fed tokens, then `path` is fed
    one token at a time; returns, for the last token of `path`, (confidence at each exit point,
    top-1 at each exit point), as a `Table` row has them. Rows are kept, so a
    sweep over thresholds asks the model only for branches it has not seen. A token goes through
    the decoder's own step (`SlotPolicy.forward`) with exits that never fire (threshold 1: no
    confidence is above it), so every exit point is asked and its numbers are the decoder's.
    """

    def __init__(self, bb, heads, fed):
        self.bb, self.heads, self.fed = bb, heads, list(fed)
        self.engine = EagerEngine(bb)
        self.policy = CopyPolicy(ExitConfig(heads=heads, thresholds=1.0).checked(bb), self.engine)
        self.rows: dict = {}
        self.model_tokens = 0  # tokens fed to the backbone (what remembering rows saves is visible here)
        self._batch = None  # one row; its state holds the line being extended
        self._pos = 0  # fed tokens the main line of the state holds
        self._snap = None  # snapshot of the main line at _pos (taken before a branch)
        self._cursor = None  # (upto, path) the live state holds when it is on a branch

    def row(self, upto: int, path) -> tuple[list, list]:
        path = tuple(int(t) for t in path)
        key = (upto, path)
        if key not in self.rows:
            self._compute(upto, path)
        return self.rows[key]

    def release(self) -> None:
        """Free the state (the remembered rows stay)."""
        self._batch = self._snap = self._cursor = None
        self._pos = 0

    @torch.no_grad()
    def _compute(self, upto, path):
        if self._cursor is not None and self._cursor == (upto, path[:-1]):
            self._feed(upto, path[:-1], path[-1])  # one more token on the branch it already holds
            return
        self._main(upto)
        for k in range(len(path)):
            self._feed(upto, path[:k], path[k])

    def _main(self, upto):
        """The live state holds exactly the first `upto` fed tokens, and a snapshot of them."""
        eng = self.engine
        if self._batch is None or self._pos > upto:  # a recurrent state cannot go back: start over
            self._batch = Batch(eng, [self.fed[:1]], 2 * len(self.fed) + 1)
            self._pos, self._snap, self._cursor = 0, None, None
        state = self._batch.state
        if self._cursor is not None:
            eng.restore(state, self._snap)
            self._cursor = None
        if self._pos < upto:
            ids = torch.tensor([self.fed[self._pos:upto]], device=eng.device)
            eng.prefill(ids, state, self._batch.pad, start=self._pos)
            self.model_tokens += upto - self._pos
            self._pos = upto
        if self._snap is None:
            self._snap = eng.snapshot(state)
        else:
            eng.update_snapshot(self._snap, state)

    def _feed(self, upto, before, token):
        """Feed `token` after main[:upto] + before (the live state holds those) and keep its row."""
        conf, top = [], _Tops(self.engine)

        def observe(j, h, c, lg):
            top.add(h, lg)
            conf.append(float(c.float()[0]))

        fed = torch.tensor([int(token)], device=self.engine.device)
        # A branch ends at its deep pass, where the full model's top-1 is never read: no final head.
        self.policy.forward(self._batch, fed, upto + len(before), observe=observe, emit=False)
        self.model_tokens += 1
        path = before + (int(token),)
        self.rows[(upto, path)] = (conf, top)
        self._cursor = (upto, path)


class _Tops:
    """Top-1 token at each exit point of one branch row, through the LM head only when asked: a
    branch reads it at the one exit point it leaves at, and the LM head can outweigh many blocks."""

    def __init__(self, engine):
        self.engine, self.hidden, self.known = engine, [], {}

    def add(self, h, logits):
        if logits is not None:  # the probe already read the LM head
            self.known[len(self.hidden)] = int(logits.argmax(-1))
        self.hidden.append(h.clone())

    def __getitem__(self, j):
        if j not in self.known:
            self.known[j] = int(self.engine.logits(self.hidden[j]).argmax(-1))
        return self.known[j]


def replay_verify(table, config, num_layers: int, off: OffSequence | None, can_truncate: bool, eos_ids=()):
    """The step logs greedy `verify` generation spends on the table's sequence: (logs of the kept
    tokens, one per scored token; discarded logs: rolled-back drafts and the final flush)."""
    L, points = num_layers, config.exit_points
    J = len(points)
    n = table.lp.shape[0]
    thresholds = list(config.thresholds)
    first = first_exit(table.conf, thresholds).tolist() if J else [J] * n
    top = table.top.tolist()
    sched = BacklogSchedule(config.max_backlog, L)
    start = table.start  # row i's step feeds the token at position start + i and predicts the next

    def run_step(j, forced, pos):
        e = L - 1 if j == J else points[j]
        return sched.step(e, pos + 1, probes=probes_asked(j, J, forced), probe_logits=config.probe_logits,
                          verified=True)

    kept = [StepLog.prefill_pass(range(L), start + 1, L)]
    kept[0].verified = True
    discarded = []
    pending = False  # drafts wait for a deep pass
    snap_upto = start + 1  # recurrent states: first position the last verified snapshot lacks
    for i in range(1, n):
        pos = start + i
        forced = sched.full
        j = J if forced else first[i]
        log = run_step(j, forced, pos)
        if j == J:  # a deep pass: the drafts along the sequence all agree (else we branched)
            kept.append(log)
            pending = False
            snap_upto = pos + 1
            continue
        if top[i][j] == top[i][J]:
            kept.append(log)
            pending = True
            continue
        # Row i's draft is wrong: generation drafts on from it until a deep pass rejects it.
        discarded.append(log)
        path = [top[i][j]]
        while True:
            bpos = pos + len(path)
            ends = i + len(path) >= n or path[-1] in eos_ids  # the output is complete: flush
            bforced = sched.full or ends
            bj = J
            if not bforced:
                conf, btop = off.row(pos + 1, path)
                bj = int(first_exit(torch.tensor([conf]), thresholds)[0])
            blog = run_step(bj, bforced, bpos)
            if bj == J:
                kept.append(blog)  # the deep pass emits the full model's token in the draft's place
                break
            discarded.append(blog)
            path.append(btop[bj])
        pending = False
        if not can_truncate:  # restored from the snapshot: accepted tokens since are replayed
            sched.replay(pos + 1 - snap_upto)
    if pending:  # the decoder's flush: one forced deep pass over the last drafts, all accepted
        discarded.append(run_step(J, True, start + n))
    return kept, discarded
