"""Data sources, the document split and packed, resumable, process-independent streams."""

import json
import re

import pytest
import torch

from meestral.data import HFSource, PackedStream, is_validation, open_source, validation_rows
from meestral.errors import MeestralError
from meestral.backbones.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def marked_docs(n, words=30):
    """Documents whose text names them (#i#), so a packed row tells which documents it holds."""
    return [" ".join([f"#{i}#"] * (words + i % 7)) for i in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(texts)))
    return path


def doc_ids(rows: torch.Tensor) -> set[int]:
    return {int(m) for row in rows.tolist() for m in re.findall(r"#(\d+)#", TOK.decode(row))}


# ---- sources -----------------------------------------------------------------------------------
def test_local_formats_give_one_document_per_file_line_or_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first file\nsecond line")
    (folder / "sub" / "b.txt").write_text("   \n")  # blank: no document
    write_jsonl(folder / "c.jsonl", ["line one", "line two"])
    pq.write_table(pa.table({"text": ["row one", "row two", None]}), folder / "d.parquet")
    (folder / "notes.md").write_text("not a data file")
    docs = list(open_source(str(folder)).documents())
    assert [t for _, t in docs] == ["first file\nsecond line", "line one", "line two", "row one", "row two"]
    assert [i for i, _ in docs] == list(range(5))
    assert list(open_source(str(folder)).documents(start=3)) == docs[3:]


def test_hf_streaming_path_reads_a_local_stand_in(tmp_path):
    texts = marked_docs(12)
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    hf = HFSource("json", data_files=str(path))  # the code path FineWeb-Edu takes, on a local file
    assert list(hf.documents()) == list(enumerate(texts))
    assert list(hf.documents(start=5)) == list(enumerate(texts))[5:]
    assert list(hf.documents()) == list(open_source(str(path)).documents())


def test_embedded_corpus_is_real_text_without_folio_duplicates():
    source = open_source("embedded")
    names = [p.name for p in source.files]
    assert "hamlet_gut.txt" in names and "britannica-11th.txt" in names
    assert not any(n.endswith("_gut_f.txt") for n in names)
    docs = dict(source.documents())
    assert len(docs) > 30 and sum(map(len, docs.values())) > 4_000_000
    assert any("To be, or not to be" in t for t in docs.values())


@pytest.mark.parametrize("make, needle", [
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no"),
    (lambda d: (d / "blank.txt").write_text("  \n\n") and d / "blank.txt", "holds no text"),
    (lambda d: (d / "bad.parquet").write_bytes(b"not parquet at all") and d / "bad.parquet", "not a readable parquet"),
    (lambda d: (d / "bad.txt").write_bytes(b"\xff\xfe\xfa broken utf-8") and d / "bad.txt", "cannot read data file"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "bad.jsonl", "line 2 is not JSON"),
    (lambda d: (d / "nofield.jsonl").write_text('{"body": "x"}\n') and d / "nofield.jsonl", "no string field 'text'"),
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "x.csv").write_text("a") and d / "x.csv", "is not one of"),
])
def test_bad_sources_fail_with_one_line(tmp_path, make, needle):
    with pytest.raises(MeestralError) as e:
        src = open_source(str(make(tmp_path)))
        src.check()
        list(src.documents())
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unreachable_dataset_names_the_fix(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline mode, set where the libraries read it (their env variables are read at import time).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MeestralError, match="--data embedded"):
        list(open_source("hf:no-such-org/no-such-dataset").documents())


def test_auto_falls_back_to_embedded_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert open_source("auto").name == "embedded"


# ---- split -------------------------------------------------------------------------------------
def test_validation_documents_never_reach_training(tmp_path):
    texts = marked_docs(60)
    source = open_source(str(write_jsonl(tmp_path / "d.jsonl", texts)))
    val_docs = {i for i, t in enumerate(texts) if is_validation(t, 0.3)}
    assert 0 < len(val_docs) < 60  # the hash split really splits

    stream = PackedStream(source, TOK, seq_len=48, batch=3, val_fraction=0.3, shuffle_buffer=4)
    seen = set()
    while (b := stream.next_batch()) is not None:
        seen |= doc_ids(b)
    val = validation_rows(source, TOK, seq_len=48, rows=1000, val_fraction=0.3)
    assert len(seen) > 30 and not seen & val_docs
    assert doc_ids(val) == val_docs


def test_split_depends_on_the_text_only():
    texts = marked_docs(200)
    picked = [is_validation(t, 0.1) for t in texts]
    assert picked == [is_validation(t, 0.1) for t in texts]
    assert 5 <= sum(picked) <= 40
    assert all(is_validation(t, 0.2) for t, p in zip(texts, picked) if p)  # a larger share keeps the smaller


# ---- packing, shuffling, position --------------------------------------------------------------
def stream_of(tmp_path, lanes=None, seed=0, n_docs=40):
    path = tmp_path / "d.jsonl"
    if not path.exists():
        write_jsonl(path, marked_docs(n_docs))
    return PackedStream(open_source(str(path)), TOK, seq_len=32, batch=4, lanes=lanes, val_fraction=0.1,
                        shuffle_buffer=3, seed=seed)


def take(stream, n):
    return [stream.next_batch() for _ in range(n)]


def test_rows_are_packed_full_with_eos_between_documents(tmp_path):
    b = stream_of(tmp_path).next_batch()
    assert b.shape == (4, 32) and b.dtype == torch.long
    whole = torch.cat(take(stream_of(tmp_path), 10)).flatten().tolist()
    assert 2 in whole and 1 in whole  # EOS closes a document, BOS opens the next


def test_processes_see_the_batches_one_process_sees(tmp_path):
    one = take(stream_of(tmp_path), 8)
    halves = [take(stream_of(tmp_path, lanes=r), 8) for r in (range(0, 2), range(2, 4))]
    for step, full in enumerate(one):
        assert torch.equal(full, torch.cat([halves[0][step], halves[1][step]]))


def test_shuffle_is_seeded(tmp_path):
    a, b, c = (torch.cat(take(stream_of(tmp_path, seed=s), 6)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_continues_the_stream_exactly(tmp_path):
    ref = stream_of(tmp_path)
    take(ref, 5)
    state = ref.state_dict()
    expected = take(ref, 12)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    resumed = stream_of(tmp_path)
    resumed.load_state_dict(torch.load(path, weights_only=True))  # through a file, as a checkpoint does
    got = take(resumed, 12)
    assert all(torch.equal(x, y) for x, y in zip(expected, got))


def test_stream_ends_when_a_row_runs_dry(tmp_path):
    stream = stream_of(tmp_path, n_docs=8)
    batches = 0
    while stream.next_batch() is not None:
        batches += 1
    assert 0 < batches < 40
