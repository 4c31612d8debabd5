"""The teacher's top-k summary of each training row, computed the first time the row is drawn and
read back every later time it is drawn.

Distillation draws rows from a pool that the teacher's sampler fills far more slowly than the
student trains on it (a device session samples ~10-20 M tokens and trains on many times that), so
most rows come back many times, and a teacher forward is about as many FLOPs as the student's
forward and backward together. The full logits of a row are 50 MB (512 x 49,152 in bf16); its top-k
summary (`kd.TeacherTopK`) is 8k + 4 bytes a position: at k = 32, 15 M tokens of pool fit in 4 GB
of GPU memory. Rows are named by `RowPool.batch_with_ids`; what is stored is exactly what the
teacher gave (float32 log-probabilities), so a cached step trains as a recomputed one.
"""

from __future__ import annotations

import torch

from meestral.training.kd import TeacherTopK


class TeacherCache:
    """Up to `max_bytes` of top-k summaries of `positions`-long rows, on `device`. Once full, rows
    not yet kept are computed every time (nothing is evicted: every kept row is as likely to be
    drawn again as a new one)."""

    def __init__(self, k: int, positions: int, max_bytes: float, device):
        self.k, self.positions, self.device = k, positions, torch.device(device)
        self.row_bytes = positions * (8 * k + 4)  # float32 log-probs, int32 ids, float32 tail mass
        self.capacity = int(max_bytes // self.row_bytes)
        self.slot: dict[int, int] = {}
        self.logp = torch.empty((0, positions, k), dtype=torch.float32, device=self.device)
        self.idx = torch.empty((0, positions, k), dtype=torch.int32, device=self.device)
        self.tail = torch.empty((0, positions), dtype=torch.float32, device=self.device)
        self.hits = self.misses = 0

    def _grow(self, need: int) -> None:
        """Room for `need` rows, doubling (appends stay cheap), never past the capacity."""
        if need <= len(self.tail):
            return
        size = min(self.capacity, max(need, 2 * len(self.tail), 64))
        for name in ("logp", "idx", "tail"):
            old = getattr(self, name)
            new = old.new_empty((size, *old.shape[1:]))
            new[: len(old)] = old
            setattr(self, name, new)

    def get(self, rows: torch.Tensor, ids: torch.Tensor, compute) -> TeacherTopK:
        """The summary of every row of `rows` [n, positions + 1] (ids [n] from the pool):
        `compute(sub_rows)` -> TeacherTopK runs once, on the rows not kept yet (each only once
        when drawn twice in a batch)."""
        keys = ids.tolist()
        new, seen = [], set()  # the first occurrence of each row not kept
        for i, key in enumerate(keys):
            if key not in self.slot and key not in seen:
                seen.add(key)
                new.append(i)
        n, k = len(keys), self.k
        out = TeacherTopK(torch.empty((n, self.positions, k), dtype=torch.float32, device=self.device),
                          torch.empty((n, self.positions, k), dtype=torch.int64, device=self.device),
                          torch.empty((n, self.positions), dtype=torch.float32, device=self.device))
        fresh: dict[int, int] = {}  # key -> row of `computed`
        if new:
            computed = compute(rows[new])
            fresh = {keys[i]: j for j, i in enumerate(new)}
            room = max(0, min(len(new), self.capacity - len(self.slot)))
            if room:
                start = len(self.slot)
                self._grow(start + room)
                sl = slice(start, start + room)
                self.logp[sl], self.idx[sl], self.tail[sl] = (computed.logp[:room], computed.idx[:room].int(),
                                                              computed.tail[:room])
                for j in range(room):
                    self.slot[keys[new[j]]] = start + j
        kept = [i for i, key in enumerate(keys) if key not in fresh]
        if kept:
            s = torch.tensor([self.slot[keys[i]] for i in kept], device=self.device)
            at = torch.tensor(kept, device=self.device)
            out.logp[at], out.idx[at], out.tail[at] = self.logp[s], self.idx[s].long(), self.tail[s]
        if fresh:
            at = [i for i, key in enumerate(keys) if key in fresh]
            src = torch.tensor([fresh[keys[i]] for i in at], device=self.device)
            at = torch.tensor(at, device=self.device)
            out.logp[at], out.idx[at], out.tail[at] = computed.logp[src], computed.idx[src], computed.tail[src]
        self.hits += len(kept)
        self.misses += n - len(kept)
        return out
