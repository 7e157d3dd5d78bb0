"""The data layer: tokenizers, local and embedded corpora, packed batches and their exact resume."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from osd.data import (
    DataError,
    DocumentSource,
    PackedBatches,
    load_documents,
    load_tokenizer,
    validation_batches,
)

BYTES = load_tokenizer("bytes")
DOCS = [f"document {i}: " + "abc " * (i % 7) for i in range(23)]  # 13 to 37 bytes each
TEXTS = ["first document", "second one", "", "  ", "third, with a tab\tinside", "fourth", "fifth and last"]
KEPT = [text for text in TEXTS if text.strip()]  # blank documents are dropped


def byte_stream(docs: list[str]) -> list[int]:
    """The packed stream of ``docs`` with the bytes tokenizer: each document's bytes, then EOS (256)."""
    return [token for doc in docs for token in (*doc.encode(), 256)]


def take(batches: PackedBatches, n: int) -> list[dict[str, torch.Tensor]]:
    return list(islice(batches, n))


def texts_of(source: DocumentSource) -> list[str]:
    return list(source.iterate())


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A private ``datasets`` cache, so the tests leave the user's cache alone."""
    return tmp_path / "hf-cache"


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face hub switched off, so that loading from it fails at once instead of retrying."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# --------------------------------------------------------------------------- packing


def test_packed_stream_is_the_documents_with_eos_between_over_epochs() -> None:
    source = DocumentSource.from_texts(DOCS)
    batches = PackedBatches(source, BYTES, batch_size=2, seq_len=8, chunk_docs=5)
    epoch_tokens = len(byte_stream(DOCS))
    n = 2 * epoch_tokens // 16 + 3  # a little over two passes
    got = take(batches, n)

    for batch in got:
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["labels"], batch["input_ids"])
    flat = torch.cat([batch["input_ids"].flatten() for batch in got]).tolist()
    assert flat == (byte_stream(DOCS) * 3)[: n * 16]
    assert batches.epoch == 2


def test_unpacked_rows_are_truncated_padded_and_masked() -> None:
    source = DocumentSource.from_texts(["ab", "x" * 20, "", "cdefg"])
    batch = next(PackedBatches(source, BYTES, batch_size=4, seq_len=8, pack=False))
    pad = eos = 256  # the bytes tokenizer pads with EOS: only the mask tells them apart

    assert batch["input_ids"].tolist() == [
        [97, 98, eos, pad, pad, pad, pad, pad],
        [120] * 8,  # truncated: no room for EOS
        [eos, pad, pad, pad, pad, pad, pad, pad],
        [99, 100, 101, 102, 103, eos, pad, pad],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 8, [1] + [0] * 7, [1] * 6 + [0] * 2]
    assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("when", ["first batch", "mid pass", "next pass"])
def test_resume_gives_exactly_the_next_batches(pack: bool, when: str) -> None:
    source = DocumentSource.from_texts(DOCS)
    settings = dict(batch_size=2, seq_len=8 if pack else 32, pack=pack, chunk_docs=7)  # rows: some cut, some padded
    per_pass = len(byte_stream(DOCS)) // 16 if pack else len(DOCS) // 2
    taken = {"first batch": 1, "mid pass": per_pass // 2, "next pass": per_pass + 1}[when]
    expected = take(PackedBatches(source, BYTES, **settings), taken + 12)

    interrupted = PackedBatches(source, BYTES, **settings)
    take(interrupted, taken)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = PackedBatches(source, BYTES, **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))

    assert resumed.epoch == interrupted.epoch == (when == "next pass")
    for got, want in zip(take(resumed, 12), expected[taken:], strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in got)


def test_state_of_another_packing_is_refused() -> None:
    source = DocumentSource.from_texts(DOCS)
    state = PackedBatches(source, BYTES, 2, 8).state_dict()
    with pytest.raises(DataError, match="the data state is for pack=True; this run has pack=False"):
        PackedBatches(source, BYTES, 2, 8, pack=False).load_state_dict(state)


def test_validation_batches_are_fixed_and_refuse_a_split_below_one_batch() -> None:
    source = DocumentSource.from_texts(DOCS)
    first = validation_batches(source, BYTES, 2, 8, max_batches=5)
    assert len(first) == 5
    again = validation_batches(source, BYTES, 2, 8, 5)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert len(validation_batches(source, BYTES, 2, 8, None)) == len(byte_stream(DOCS)) // 16
    assert len(validation_batches(source, BYTES, 4, 8, None, pack=False)) == len(DOCS) // 4

    small = DocumentSource.from_texts(["ab", "cd"], name="tiny")
    with pytest.raises(DataError, match="validation split tiny has 6 tokens, fewer than one batch of 4 x 8"):
        validation_batches(small, BYTES, 4, 8, 10)
    with pytest.raises(DataError, match="has 2 documents, fewer than one batch of 4 rows"):
        validation_batches(small, BYTES, 4, 8, 10, pack=False)


# --------------------------------------------------------------------------- tokenizers


def test_bytes_tokenizer() -> None:
    assert (BYTES.vocab_size, BYTES.eos_id, BYTES.pad_id) == (257, 256, 256)
    assert BYTES.encode(["hé", ""]) == [[104, 195, 169], []]


@pytest.mark.parametrize("path,vocab_size", [("t5_spiece.model", 32000), ("t5_tokenizer.json", 32100)])
def test_t5_tokenizer_files_load(shared_dir: Path, path: str, vocab_size: int) -> None:
    tokenizer = load_tokenizer(str(shared_dir / "tokenizers" / path))
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (vocab_size, 1, 0)
    assert tokenizer.encode(["Hello world.", "A second text"]) == [[8774, 296, 5], [71, 511, 1499]]  # no </s> added


def test_tokenizer_directory_loads_with_auto_tokenizer(shared_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    saved = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(shared_dir / "tokenizers" / "t5_tokenizer.json"), eos_token="</s>", pad_token="<pad>"
    )
    saved.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (32100, 1, 0)
    assert tokenizer.encode(["Hello world."]) == [[8774, 296, 5]]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.json", None, "tokenizer file not found: .*missing.json"),
        ("missing.model", None, "tokenizer file not found: .*missing.model"),
        ("broken.json", "{not json", "cannot read tokenizers JSON .*broken.json: "),
        ("vocab.json", '{"a": 0, "b": 1}', "vocab.json is JSON but not a Hugging Face tokenizers file"),
        ("broken.model", "not a protobuf", "cannot read SentencePiece model .*broken.model: "),
    ],
)
def test_bad_tokenizer_file_is_named(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_tokenizer(str(tmp_path / name))


def test_hub_tokenizer_offline_suggests_a_local_file(hub_offline: None) -> None:
    with pytest.raises(DataError, match=r"tokenizer 'osd-tests/no-such-tokenizer' .*local SentencePiece \.model"):
        load_tokenizer("osd-tests/no-such-tokenizer")


# --------------------------------------------------------------------------- documents


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)))


def write_json_gz(path: Path, texts: list[str]) -> None:
    path.write_bytes(gzip.compress("".join(json.dumps({"text": text}) + "\n" for text in texts).encode()))


def write_json_list(path: Path, texts: list[str]) -> None:
    path.write_text(json.dumps([{"text": text, "url": f"u{i}"} for i, text in enumerate(texts)]))


def write_parquet(path: Path, texts: list[str]) -> None:
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path)


def write_txt(path: Path, texts: list[str]) -> None:
    path.write_text("\n".join(texts) + "\n")


@pytest.mark.parametrize(
    "name,write",
    [("c.jsonl", write_jsonl), ("c.json.gz", write_json_gz), ("c.json", write_json_list),
     ("c.parquet", write_parquet), ("c.txt", write_txt)],
)
def test_local_formats_load_and_hold_out_the_last_documents(
    tmp_path: Path, cache: Path, name: str, write: Callable[[Path, list[str]], None]
) -> None:
    write(tmp_path / name, TEXTS)
    train = load_documents(str(tmp_path / name), "train", val_docs=2, cache_dir=cache)
    validation = load_documents(str(tmp_path / name), "validation", val_docs=2, cache_dir=cache)

    assert texts_of(train) == KEPT[:-2] and train.num_docs == len(KEPT) - 2
    assert texts_of(validation) == KEPT[-2:]
    assert list(train.iterate(2)) == KEPT[2:-2]
    assert list(validation.iterate(5)) == []
    assert texts_of(load_documents(str(tmp_path / name), "validation", val_docs=99, cache_dir=cache)) == KEPT[1:]
    assert texts_of(load_documents(str(tmp_path / name), "all", cache_dir=cache)) == KEPT


def test_globs_and_lists_keep_their_order(tmp_path: Path, cache: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["a1", "a2"])
    pq.write_table(pa.table({"text": pa.array(["b1", "b2"], pa.large_string())}), tmp_path / "b.parquet")
    write_jsonl(tmp_path / "c.jsonl", ["c1", "c2"])

    def documents(spec: str) -> list[str]:
        return texts_of(load_documents(spec, val_docs=1, cache_dir=cache))

    assert documents(f"{tmp_path}/*.jsonl") == ["a1", "a2", "c1"]
    assert documents(f"{tmp_path}/c.jsonl, {tmp_path}/b.parquet,{tmp_path}/a.jsonl") == ["c1", "c2", "b1", "b2", "a1"]


def broken_gzip(path: Path) -> None:
    lines = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(500))
    path.write_bytes(gzip.compress(lines.encode())[:-40])  # cut before the end-of-stream marker


@pytest.mark.parametrize(
    "name,write,message",
    [
        ("nope.jsonl", None, r"no such file: .*nope\.jsonl"),
        ("*.parquet", None, r"no file matches .*\*\.parquet"),
        ("c.csv", lambda p: p.write_text("text\nhello\n"), r"unsupported file type: .*c\.csv"),
        ("fields.jsonl", lambda p: p.write_text('{"content": "hi", "id": 1}\n'),
         r"fields\.jsonl has no field 'text'; its records have: content, id"),
        ("number.jsonl", lambda p: p.write_text('{"text": 5}\n{"text": 6}\n'),
         r"field 'text' of .*number\.jsonl is .*int64.*not text"),
        ("blank.jsonl", lambda p: write_jsonl(p, ["", "  \n "]), "empty corpus: no non-empty 'text' in .*blank.jsonl"),
        ("one.jsonl", lambda p: write_jsonl(p, ["only one", ""]), "has 1 non-empty document; at least 2"),
        ("broken.json.gz", broken_gzip, r"cannot read .*broken\.json\.gz: Compressed file ended"),
        ("bad.jsonl", lambda p: p.write_text('{"text": "fine"}\n{"text": \n'),
         r"cannot read .*bad\.jsonl: JSON parse error"),
        ("bad.parquet", lambda p: p.write_bytes(b"PAR1 not parquet"), r"cannot read .*bad\.parquet: .*magic bytes"),
        ("latin1.txt", lambda p: p.write_bytes("caf\xe9\n".encode("latin-1")),
         r"cannot read .*latin1\.txt: 'utf-8' codec"),
    ],
)
def test_bad_local_data_is_named(
    tmp_path: Path, cache: Path, name: str, write: Callable[[Path], None] | None, message: str
) -> None:
    if write is not None:
        write(tmp_path / name)
    with pytest.raises(DataError, match=message) as error:
        load_documents(str(tmp_path / name), cache_dir=cache)
    assert "\n" not in str(error.value)


def test_unknown_split_of_local_data_is_refused(tmp_path: Path, cache: Path) -> None:
    write_jsonl(tmp_path / "c.jsonl", TEXTS)
    with pytest.raises(DataError, match="unknown split 'test' for .*c.jsonl: choose 'train', 'validation' or 'all'"):
        load_documents(str(tmp_path / "c.jsonl"), "test", cache_dir=cache)


def test_embedded_corpus_is_offline_deterministic_and_split() -> None:
    train, validation = load_documents("embedded", "train"), load_documents("embedded", "validation")
    train_docs, validation_docs = texts_of(train), texts_of(validation)

    assert sum(map(len, train_docs + validation_docs)) > 300_000
    assert 0.04 < len(validation_docs) / len(train_docs + validation_docs) < 0.06
    assert not set(train_docs) & set(validation_docs)
    assert texts_of(load_documents("embedded", "validation")) == validation_docs
    assert next(PackedBatches(train, BYTES, 4, 64))["input_ids"].shape == (4, 64)


def test_c4_from_the_hub_offline_says_to_pass_local_files(hub_offline: None) -> None:
    with pytest.raises(DataError, match="cannot stream allenai/c4 .*pass local files instead"):
        load_documents("c4")


# --------------------------------------------------------------------------- the shared real text


@pytest.mark.parametrize(
    "spec,num_docs",
    [("c4_train_sample.jsonl", 1000), ("c4-sample.0*.json.gz", 30), ("wikitext2_valid.txt", 2461)],
)
def test_shared_corpora_load(shared_dir: Path, cache: Path, spec: str, num_docs: int) -> None:
    path = str(shared_dir / "data" / spec)
    train = load_documents(path, "train", val_docs=10, cache_dir=cache)
    validation = load_documents(path, "validation", val_docs=10, cache_dir=cache)
    assert (train.num_docs, validation.num_docs) == (num_docs - 10, 10)


def test_c4_sample_packs_like_the_shared_fixture(shared_dir: Path, cache: Path, c4_tokens: torch.Tensor) -> None:
    """The first batches from the real C4 sample with the real t5 tokenizer are the rows of ``c4_tokens``."""
    source = load_documents(str(shared_dir / "data" / "c4_train_sample.jsonl"), cache_dir=cache)
    tokenizer = load_tokenizer(str(shared_dir / "tokenizers" / "t5_tokenizer.json"))
    rows = torch.cat([batch["input_ids"] for batch in take(PackedBatches(source, tokenizer, 8, 64), 10)])
    assert torch.equal(rows, c4_tokens[:80])


def test_c4_sample_validation_batches(shared_dir: Path, cache: Path) -> None:
    source = load_documents(str(shared_dir / "data" / "c4_train_sample.jsonl"), "validation", cache_dir=cache)
    tokenizer = load_tokenizer(str(shared_dir / "tokenizers" / "t5_spiece.model"))
    batches = validation_batches(source, tokenizer, 4, 256, max_batches=None, pack=False)
    assert len(batches) == 25  # the 100 held-out documents, 4 rows each
    assert all(batch["input_ids"].max() < tokenizer.vocab_size for batch in batches)
    assert all(torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0) for batch in batches)
