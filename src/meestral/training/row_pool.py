"""Training rows for the trainers that learn from a teacher's text (adaptation, distillation): the
teacher's sampled shards (`meestral distill sample`), packed as they appear, mixed with rows of a
fixed corpus."""

from __future__ import annotations

from pathlib import Path

import torch


class RowPool:
    """Training rows of `seq_len` tokens packed from the teacher's shards (read as they appear) and
    from a fixed corpus tensor; `batch(n)` mixes them in the ratio `corpus_share`."""

    def __init__(self, data_dir: str | None, corpus: torch.Tensor | None, seq_len: int, eos: int,
                 corpus_share: float, seed: int):
        self.dir = Path(data_dir) if data_dir else None
        self.seq_len, self.eos, self.share = seq_len, eos, corpus_share
        self.corpus = corpus
        self.buf = torch.zeros((0, seq_len), dtype=torch.int32)  # grows by doubling: appends stay cheap
        self.n = 0
        self.seen: set[str] = set()
        self.gen = torch.Generator().manual_seed(seed)
        self.leftover: list[int] = []

    def refresh(self) -> int:
        """Pack shards not read yet; returns how many rows were added."""
        if self.dir is None or not self.dir.is_dir():
            return 0
        new = []
        for p in sorted(self.dir.glob("shard-*.pt")):
            if p.name in self.seen:
                continue
            try:
                docs = torch.load(p, weights_only=False)["docs"]
            except Exception:  # a shard being renamed into place right now: next refresh
                continue
            self.seen.add(p.name)
            buf = self.leftover
            for d in docs:
                buf.extend(d.tolist())
                if buf[-1] != self.eos:
                    buf.append(self.eos)
            n = len(buf) // self.seq_len
            if n:
                new.append(torch.tensor(buf[: n * self.seq_len], dtype=torch.int32).view(n, self.seq_len))
            self.leftover = buf[n * self.seq_len:]
        for rows in new:
            need = self.n + len(rows)
            if need > len(self.buf):
                grown = torch.zeros((max(need, 2 * len(self.buf)), self.seq_len), dtype=torch.int32)
                grown[: self.n] = self.buf[: self.n]
                self.buf = grown
            self.buf[self.n: need] = rows
            self.n = need
        return sum(x.shape[0] for x in new)

    @property
    def rows(self) -> torch.Tensor:
        return self.buf[: self.n]

    def batch(self, n: int) -> torch.Tensor:
        return self.batch_with_ids(n)[0]

    def batch_with_ids(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [n, seq_len] int64, ids [n] int64): a row's id names it for the whole run (shard
        rows 0, 1, ... in the order they were packed, never moved; corpus rows -1, -2, ...), so
        what was computed on a row once (the teacher's top-k) can be kept by id."""
        n_corpus = 0
        if self.corpus is not None and len(self.corpus):
            n_corpus = n if not len(self.rows) else int(round(n * self.share))
        parts, ids = [], []
        if n_corpus:
            i = torch.randint(len(self.corpus), (n_corpus,), generator=self.gen)
            parts.append(self.corpus[i])
            ids.append(-1 - i)
        if n - n_corpus:
            i = torch.randint(len(self.rows), (n - n_corpus,), generator=self.gen)
            parts.append(self.rows[i])
            ids.append(i)
        return torch.cat(parts).long(), torch.cat(ids)
