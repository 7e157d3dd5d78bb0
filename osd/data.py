"""The data layer of ``osd train``: tokenizers, document sources and packed token batches.

Three pieces, each usable alone:

* :func:`load_tokenizer` wraps a byte-level tokenizer (``"bytes"``, no download), a
  SentencePiece ``.model``, a Hugging Face ``tokenizers`` ``.json`` or a
  ``transformers.AutoTokenizer`` name/directory in one :class:`Tokenizer`.
* :func:`load_documents` opens a corpus as a :class:`DocumentSource`: the docstrings of
  Python's standard library (``"embedded"``, offline), C4 streamed from the hub (``"c4"``),
  or local ``.json``/``.jsonl``/``.json.gz``/``.parquet``/``.txt`` files read with the
  ``datasets`` library, with the last documents held out as the validation split.
* :class:`PackedBatches` turns a source into an endless, exactly resumable stream of
  ``(batch_size, seq_len)`` batches; :func:`validation_batches` makes the fixed held-out set.

Every problem with the data or the tokenizer raises :class:`DataError`, whose message is one
line meant for the user.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.exceptions import DatasetGenerationError
from torch import Tensor

EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>")  # tried in this order in a tokenizers JSON
C4_NAMES = ("c4", "allenai/c4")
EMBEDDED_VALIDATION_FRACTION = 0.05
READ_ROWS = 1000  # documents read from an Arrow-backed dataset at a time
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
FILE_BUILDERS = {**dict.fromkeys(JSON_SUFFIXES, "json"), ".parquet": "parquet", ".txt": "text"}
GLOB_CHARS = frozenset("*?[")
IGNORE_INDEX = -100  # the label that torch's cross-entropy (and transformers) skips

# Standard-library modules whose docstrings make the embedded corpus: pure Python (or with a
# C part that is always built), so the corpus is the same wherever this Python version runs.
EMBEDDED_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "email", "enum",
    "fractions", "functools", "gzip", "hashlib", "heapq", "html.parser", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "mailbox", "math", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "shlex", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "warnings", "xml.etree.ElementTree", "zipfile",
)


class DataError(ValueError):
    """A one-line, user-facing problem with data or tokenizer (the CLI prints ``str(e)`` without a traceback)."""


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name where the message is empty)."""
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class Tokenizer:
    """A thin wrapper around whatever tokenizes: ids in ``[0, vocab_size)``, no special tokens added.

    ``eos_id`` ends every document in the packed stream; ``pad_id`` fills unpacked rows
    (it may equal ``eos_id``). ``encoder`` maps a batch of texts to their ids.
    """

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    encoder: Callable[[list[str]], list[list[int]]] = field(repr=False, compare=False)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text, without special tokens: one list per text, in order."""
        return self.encoder(list(texts))


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer by spec.

    * ``"bytes"``: byte-level, ids 0..255 are the UTF-8 bytes and 256 is EOS and pad (vocab 257).
    * a path ending in ``.model``: SentencePiece; EOS is the piece ``</s>``, pad ``<pad>`` (else EOS).
    * a path ending in ``.json``: a Hugging Face ``tokenizers`` file; EOS is the first of
      ``</s>``, ``<|endoftext|>``, ``<eos>`` it has, pad ``<pad>`` (else EOS).
    * anything else (a directory, or a hub name such as ``"t5-base"``): ``transformers.AutoTokenizer``.

    Raises :class:`DataError` for a missing or unreadable file, a tokenizer without EOS, or a
    name that cannot be loaded (the hub is unreachable offline).
    """
    if spec == "bytes":
        return Tokenizer("bytes", 257, 256, 256, lambda texts: [list(text.encode("utf-8")) for text in texts])
    if spec.endswith((".model", ".json")):
        if not Path(spec).is_file():
            raise DataError(f"tokenizer file not found: {spec}")
        return _sentencepiece(spec) if spec.endswith(".model") else _tokenizers_json(spec)
    return _auto_tokenizer(spec)


def _sentencepiece(path: str) -> Tokenizer:
    """A SentencePiece model file (e.g. t5-base's ``spiece.model``: vocab 32000, EOS 1, pad 0)."""
    import sentencepiece

    try:
        model = sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot read SentencePiece model {path}: {_one_line(e)}") from e

    def piece_id(piece: str) -> int | None:
        index = model.piece_to_id(piece)  # the unknown piece's id where the model lacks `piece`
        return index if model.id_to_piece(index) == piece else None

    eos, pad = piece_id("</s>"), piece_id("<pad>")
    if eos is None:
        raise DataError(f"SentencePiece model {path} has no '</s>' piece to end documents with")
    return Tokenizer(path, model.get_piece_size(), eos, eos if pad is None else pad, model.encode)


def _tokenizers_json(path: str) -> Tokenizer:
    """A Hugging Face ``tokenizers`` JSON (e.g. t5-base's ``tokenizer.json``: vocab 32100, EOS 1, pad 0)."""
    import tokenizers

    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read tokenizers JSON {path}: {_one_line(e)}") from e
    if not isinstance(content, dict) or "model" not in content:
        raise DataError(f"{path} is JSON but not a Hugging Face tokenizers file (no 'model' entry); pass a tokenizer.json, a .model or a tokenizer directory")
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise DataError(f"cannot read tokenizers JSON {path}: {_one_line(e)}") from e
    backend.no_truncation()  # a saved file may carry truncation or padding; packing needs neither
    backend.no_padding()
    eos = next((i for token in EOS_TOKENS if (i := backend.token_to_id(token)) is not None), None)
    if eos is None:
        raise DataError(f"tokenizers JSON {path} has none of {', '.join(EOS_TOKENS)} to end documents with")
    pad = backend.token_to_id("<pad>")

    def encode(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer(path, backend.get_vocab_size(with_added_tokens=True), eos, eos if pad is None else pad, encode)


def _auto_tokenizer(spec: str) -> Tokenizer:
    """``transformers.AutoTokenizer.from_pretrained(spec)``: a local directory, or a hub name (needs the network)."""
    import transformers

    try:
        backend = transformers.AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot load tokenizer {spec!r} with transformers.AutoTokenizer ({_one_line(e)}); "
            "without the Hugging Face hub, pass a local SentencePiece .model or tokenizers .json file"
        ) from e
    if backend.eos_token_id is None:
        raise DataError(f"tokenizer {spec!r} has no EOS token to end documents with")
    eos, pad = backend.eos_token_id, backend.pad_token_id

    def encode(texts: list[str]) -> list[list[int]]:
        return backend(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]

    return Tokenizer(spec, len(backend), eos, eos if pad is None else pad, encode)


# --------------------------------------------------------------------------- documents


class DocumentSource:
    """An ordered sequence of documents (strings), read from any index on.

    Backed by a ``datasets.Dataset`` (local files, the embedded corpus: its length is known)
    or a streaming ``datasets.IterableDataset`` (the hub: its length is unknown).
    """

    def __init__(self, name: str, dataset: datasets.Dataset | datasets.IterableDataset, text_field: str = "text"):
        self.name = name
        self.dataset = dataset
        self.text_field = text_field

    @classmethod
    def from_texts(cls, texts: Sequence[str], name: str = "texts") -> DocumentSource:
        """A source over the given texts, in memory."""
        return cls(name, datasets.Dataset.from_dict({"text": list(texts)}))

    @property
    def num_docs(self) -> int | None:
        """The number of documents, or ``None`` when streaming."""
        return len(self.dataset) if isinstance(self.dataset, datasets.Dataset) else None

    def iterate(self, start: int = 0) -> Iterator[str]:
        """The documents from index ``start`` on (none if ``start`` is past the end), in order."""
        if isinstance(self.dataset, datasets.IterableDataset):
            return (example[self.text_field] for example in self.dataset.skip(start))
        return self._read(start)

    def _read(self, start: int) -> Iterator[str]:
        for begin in range(start, len(self.dataset), READ_ROWS):
            yield from self.dataset[begin : begin + READ_ROWS][self.text_field]

    def __repr__(self) -> str:
        return f"DocumentSource({self.name!r}, num_docs={self.num_docs})"


def load_documents(
    spec: str,
    split: str = "train",
    text_field: str = "text",
    val_docs: int = 100,
    cache_dir: str | os.PathLike | None = None,
) -> DocumentSource:
    """The ``split`` (``"train"``, ``"validation"`` or ``"all"``) of a corpus.

    * ``"embedded"``: docstrings of standard-library modules and their public members
      (~400k characters, offline, deterministic for a Python version); the last 5% of
      documents are the validation split.
    * ``"c4"`` / ``"allenai/c4"``: C4 ``en`` streamed from the Hugging Face hub, with C4's own
      splits (any ``split`` name C4 has); ``num_docs`` is ``None``.
    * local files: a path, a comma-separated list of paths or globs (matches sorted), each
      ``.json``/``.jsonl`` (JSON lines or a JSON list of records, optionally ``.gz``),
      ``.parquet`` (records with a ``text_field`` column) or ``.txt`` (one document per line);
      ``**`` in a glob matches folders recursively.
      Read with ``datasets.load_dataset`` (cached under ``cache_dir``, default the datasets
      cache), in the order given; documents that are empty or only whitespace are dropped.
      The last ``val_docs`` documents (at most all but one) are the validation split; ``"all"``
      is every document (e.g. for files that are only ever used for validation).

    ``text_field`` applies to local files and C4, ``val_docs`` and ``cache_dir`` to local files.

    Raises :class:`DataError` for a missing file, a glob that matches nothing, an unreadable
    or corrupt file, records without ``text_field``, fewer than two non-empty documents, or
    an unreachable hub.
    """
    if spec in C4_NAMES:
        return _c4(split, text_field)
    if split not in ("train", "validation", "all"):
        raise DataError(f"unknown split {split!r} for {spec}: choose 'train', 'validation' or 'all'")
    if spec == "embedded":
        dataset = datasets.Dataset.from_dict({"text": list(_stdlib_docstrings())})
        num_val = max(1, round(EMBEDDED_VALIDATION_FRACTION * len(dataset)))
        return DocumentSource(f"embedded ({split})", _split(dataset, split, num_val), "text")
    if val_docs < 1:
        raise ValueError(f"val_docs must be >= 1, got {val_docs}")
    dataset = _load_files(_resolve_files(spec), text_field, cache_dir)
    if len(dataset) < 2:
        raise DataError(f"{spec} has 1 non-empty document; at least 2 are needed to hold one out for validation")
    return DocumentSource(f"{spec} ({split})", _split(dataset, split, min(val_docs, len(dataset) - 1)), text_field)


def _c4(split: str, text_field: str) -> DocumentSource:
    """C4 ``en``, streamed from the hub."""
    try:
        dataset = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    except OSError as e:  # ConnectionError (no network) and DatasetNotFoundError are OSErrors
        raise DataError(
            f"cannot stream allenai/c4 (en, split {split!r}) from the Hugging Face hub ({_one_line(e)}): "
            "is the hub reachable? Without it, pass local files instead, e.g. 'c4/en/c4-train.*.json.gz'"
        ) from e
    return DocumentSource(f"allenai/c4 ({split})", dataset, text_field)


@functools.cache
def _stdlib_docstrings() -> tuple[str, ...]:
    """The docstrings of ``EMBEDDED_MODULES``, their public classes and functions and the public
    methods of those classes, in a fixed order, each distinct text once."""
    objects: list[Any] = []
    for name in EMBEDDED_MODULES:
        module = importlib.import_module(name)
        objects.append(module)
        for attr, member in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            objects.append(member)
            if inspect.isclass(member):
                objects += [method for key, method in sorted(vars(member).items())
                            if not key.startswith("_") and callable(method)]
    with warnings.catch_warnings():  # reading a deprecated member's docstring warns (typing.io, ...)
        warnings.simplefilter("ignore", DeprecationWarning)
        return tuple(dict.fromkeys(doc for doc in map(inspect.getdoc, objects) if doc))


def _split(dataset: datasets.Dataset, split: str, num_val: int) -> datasets.Dataset:
    """The last ``num_val`` documents (``"validation"``), all the others (``"train"``) or all (``"all"``)."""
    if split == "all":
        return dataset
    cut = len(dataset) - num_val
    return dataset.select(range(cut, len(dataset)) if split == "validation" else range(cut))


def _resolve_files(spec: str) -> list[str]:
    """The files a comma-separated list of paths and globs names, in order (each glob's matches sorted)."""
    files: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if GLOB_CHARS & set(part):
            matches = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"no file matches {part}")
            files += matches
        elif os.path.isfile(part):
            files.append(part)
        elif os.path.isdir(part):
            raise DataError(f"{part} is a directory; name its files, e.g. '{os.path.join(part, '*.jsonl')}'")
        else:
            raise DataError(f"no such file: {part}")
    if not files:
        raise DataError(f"no data files in {spec!r}")
    return files


def _builder(path: str) -> str:
    """The ``datasets`` packaged builder that reads ``path``, by its suffix."""
    for suffix, builder in FILE_BUILDERS.items():
        if path.endswith(suffix):
            return builder
    raise DataError(f"unsupported file type: {path} (expected one of {', '.join(FILE_BUILDERS)})")


def _load_files(files: list[str], text_field: str, cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    """The non-empty ``text_field`` values of all files, in order, as a one-column dataset."""
    dataset = datasets.concatenate_datasets([_load_file(path, text_field, cache_dir) for path in files])
    keep = _non_blank_rows(dataset, text_field)
    if len(keep) == 0:
        raise DataError(f"empty corpus: no non-empty '{text_field}' in {', '.join(files)}")
    return dataset if len(keep) == len(dataset) else dataset.select(keep, keep_in_memory=True)


def _load_file(path: str, text_field: str, cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    """One file through ``datasets.load_dataset``, reduced to its ``text_field`` column.

    Files are loaded one by one so that an error names the file it comes from.
    """
    builder = _builder(path)
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes)")
    try:
        with _no_progress_bars():
            dataset = datasets.load_dataset(builder, data_files=[path], split="train", cache_dir=cache_dir)
    except DatasetGenerationError as e:  # its own message is generic; the cause says what is wrong
        raise DataError(f"cannot read {path}: {_one_line(e.__cause__ or e)}") from e
    except (OSError, EOFError, ValueError, StopIteration) as e:  # broken gzip, not Parquet, no record ...
        raise DataError(f"cannot read {path}: {_one_line(e)}") from e
    if text_field not in dataset.column_names:
        raise DataError(f"{path} has no field '{text_field}'; its records have: {', '.join(dataset.column_names)}")
    lacking = dataset.data.column(text_field).null_count
    if lacking:
        raise DataError(f"{lacking} of {len(dataset)} records of {path} have no '{text_field}' (or a null one); fix or filter the file")
    feature = dataset.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"field '{text_field}' of {path} is {feature}, not text")
    dataset = dataset.select_columns([text_field])
    if feature.dtype == "large_string":  # so that it concatenates with the files that have "string"
        dataset = dataset.cast_column(text_field, datasets.Value("string"))
    return dataset


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Without ``datasets``' progress bars (a local file reads in moments; its bars would
    bury the one line that names a problem), restoring the setting after."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _non_blank_rows(dataset: datasets.Dataset, text_field: str) -> np.ndarray:
    """Indices of the rows whose text has a non-whitespace character, read chunk by chunk."""
    column = dataset.data.column(text_field)
    flags = [pc.fill_null(pc.match_substring_regex(chunk, r"\S"), False).to_numpy(zero_copy_only=False)
             for chunk in column.chunks]
    return np.flatnonzero(np.concatenate(flags)) if flags else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- batches


class PackedBatches(Iterator[dict[str, Tensor]]):
    """An endless iterator of ``(batch_size, seq_len)`` LongTensor batches from a source.

    ``pack=True`` (default): every document's ids followed by ``eos_id`` make one stream, cut
    into rows of ``seq_len``: no padding. Yields ``{"input_ids", "labels"}``, both
    ``(batch_size, seq_len)``, equal (the model shifts labels itself).

    ``pack=False`` (the GaLore/OSD papers' way): a row per document, its ids and ``eos_id``
    truncated to ``seq_len`` and right-padded with ``pad_id``. Yields ``{"input_ids",
    "labels", "attention_mask"}``, each ``(batch_size, seq_len)``: labels are the ids with
    ``-100`` at pads, the mask is 1 on tokens and 0 on pads.

    Documents are read and tokenized lazily, ``chunk_docs`` at a time. With ``repeat`` the
    source is read over and over (epochs); without, iteration stops when a pass ends (the
    incomplete last batch dropped). Under data parallelism every rank reads the same batches
    and trains on its share of them (``osd.distributed.Parallel.share``), so that a run
    computes what a single process would.

    ``state_dict()``/``load_state_dict()`` resume exactly: a fresh iterator given the state
    yields the very batches the original would have yielded next.
    """

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        pack: bool = True,
        repeat: bool = True,
        chunk_docs: int = 64,
    ):
        sizes = {"batch_size": batch_size, "seq_len": seq_len, "chunk_docs": chunk_docs}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seq_len, self.pack = batch_size, seq_len, pack
        self.repeat, self.chunk_docs = repeat, chunk_docs
        self._epoch = 0
        self._position = 0  # index in the source of the next document not yet tokenized
        # Tokenized, not yet yielded: packing, a 1-D token stream (lengths unused); else
        # rows (n, seq_len) padded with pad_id, and the number of tokens in each (n,).
        self._tokens = torch.zeros(0 if pack else (0, seq_len), dtype=torch.long)
        self._lengths = torch.zeros(0, dtype=torch.long)
        self._documents: Iterator[str] | None = None

    @property
    def epoch(self) -> int:
        """Passes over the source completed before the next document to read."""
        return self._epoch

    @property
    def buffered(self) -> int:
        """Tokens (packing) or rows (not packing) tokenized but not yet yielded."""
        return len(self._tokens)

    def __next__(self) -> dict[str, Tensor]:
        needed = self.batch_size * self.seq_len if self.pack else self.batch_size
        while len(self._tokens) < needed:
            texts = list(islice(self._unread_documents(), self.chunk_docs))
            if not texts:
                raise StopIteration
            self._append(self.tokenizer.encode(texts))
        return self._take_packed() if self.pack else self._take_rows()

    def _unread_documents(self) -> Iterator[str]:
        """The documents from ``_position`` on, pass after pass with ``repeat``: one generator, kept."""
        if self._documents is None:
            self._documents = self._read_passes()
        return self._documents

    def _read_passes(self) -> Iterator[str]:
        while True:
            start, found = self._position, False
            for index, text in enumerate(self.source.iterate(start), start):
                self._position, found = index + 1, True
                yield text
            if not self.repeat:
                return
            if start == 0 and not found:
                raise DataError(f"{self.source.name} has no documents")
            self._epoch, self._position = self._epoch + 1, 0

    def _append(self, encoded: list[list[int]]) -> None:
        """Add tokenized documents to the buffer: to the stream, each followed by EOS, or as rows."""
        eos = self.tokenizer.eos_id
        if self.pack:
            stream = torch.tensor([token for ids in encoded for token in (*ids, eos)], dtype=torch.long)
            self._tokens = torch.cat([self._tokens, stream])
            return
        rows = torch.full((len(encoded), self.seq_len), self.tokenizer.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(encoded), dtype=torch.long)
        for i, ids in enumerate(encoded):
            row = [*ids, eos][: self.seq_len]
            rows[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            lengths[i] = len(row)
        self._tokens = torch.cat([self._tokens, rows])
        self._lengths = torch.cat([self._lengths, lengths])

    def _take_packed(self) -> dict[str, Tensor]:
        size = self.batch_size * self.seq_len
        input_ids = self._tokens[:size].view(self.batch_size, self.seq_len)
        self._tokens = self._tokens[size:]
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    def _take_rows(self) -> dict[str, Tensor]:
        input_ids, lengths = self._tokens[: self.batch_size], self._lengths[: self.batch_size]
        self._tokens, self._lengths = self._tokens[self.batch_size :], self._lengths[self.batch_size :]
        mask = torch.arange(self.seq_len) < lengths[:, None]
        labels = input_ids.masked_fill(~mask, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask.long()}

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: plain ints and bools and LongTensors (``torch.load(weights_only=True)`` reads it).

        ``epoch``, ``position`` (the next document to read), ``pack``, ``tokens`` (tokens or
        rows read but not yielded) and ``lengths`` (of those rows).
        """
        return {
            "epoch": self._epoch,
            "position": self._position,
            "pack": self.pack,
            "tokens": self._tokens.clone(),  # a copy: a view would save the whole storage behind it
            "lengths": self._lengths.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of an iterator with the same settings;
        the ``rank`` and ``world_size`` that earlier versions saved, always 0 and 1, are ignored)."""
        if state["pack"] != self.pack:
            raise DataError(f"the data state is for pack={state['pack']}; this run has pack={self.pack}")
        if not self.pack and state["tokens"].shape[1] != self.seq_len:
            width = state["tokens"].shape[1]
            raise DataError(f"the data state has rows of {width} tokens; this run has seq_len {self.seq_len}")
        self._epoch, self._position = state["epoch"], state["position"]
        self._tokens, self._lengths = state["tokens"].clone(), state["lengths"].clone()
        self._documents = None


def validation_batches(
    source: DocumentSource,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    max_batches: int | None,
    pack: bool = True,
) -> list[dict[str, Tensor]]:
    """The first ``max_batches`` (all, if ``None``) full batches of one pass over ``source``,
    as :class:`PackedBatches` makes them: the same list on every call.

    Raises :class:`DataError` when the source holds less than one batch.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    batches = PackedBatches(source, tokenizer, batch_size, seq_len, pack=pack, repeat=False)
    result = list(islice(batches, max_batches))
    if not result:
        unit, size = ("tokens", f"{batch_size} x {seq_len}") if pack else ("documents", f"{batch_size} rows")
        raise DataError(f"validation split {source.name} has {batches.buffered} {unit}, fewer than one batch of {size}")
    return result
