"""Sample texts and their token ids. Sample `i` of a dataset is always the same text, whatever the length."""

from __future__ import annotations

import glob
import random
import re
from functools import lru_cache
from pathlib import Path

from .config import DatasetConfig
from .errors import UserError, one_line

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def second_half(text: str) -> str:
    """The reference compresses the second half, by sentences, of each chunk."""
    sents = sentences(text)
    return " ".join(sents[len(sents) // 2 :])


def chunk_by_words(text: str, chunk_words: int) -> list[str]:
    """Consecutive runs of whole sentences holding about `chunk_words` words each."""
    chunks, current, count = [], [], 0
    for sent in sentences(text):
        current.append(sent)
        count += len(sent.split())
        if count >= chunk_words:
            chunks.append(" ".join(current))
            current, count = [], 0
    if current:
        chunks.append(" ".join(current))
    return chunks


@lru_cache(maxsize=1)
def pydoc_prose() -> str:
    """The prose paragraphs of CPython's bundled help topics (code blocks and headings dropped)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            lines = para.strip("\n").splitlines()
            if not lines or lines[0].startswith((" ", "\t", ">>>")) or set(lines[-1].strip()) <= set("*=-~^"):
                continue
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n".join(paragraphs)


def _natural_chunks(cfg: DatasetConfig) -> list[str]:
    if cfg.source == "pydoc":
        chunks = chunk_by_words(pydoc_prose(), cfg.chunk_words)
    elif cfg.source == "files":
        chunks = _file_chunks(cfg)
    elif cfg.source == "pg19":
        chunks = _pg19_chunks(cfg)
    else:
        raise UserError(f"dataset source '{cfg.source}' is unknown: choose pydoc, pg19, files or random")
    return [second_half(c) for c in chunks] if cfg.second_half else chunks


def _file_chunks(cfg: DatasetConfig) -> list[str]:
    paths = sorted(glob.glob(cfg.path, recursive=True))
    if not paths:
        raise UserError(f"datasets.files.path={cfg.path!r} matches no file: give a glob of readable text files")
    chunks = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise UserError(f"cannot read {path} (datasets.files.path={cfg.path!r}): {err.strerror}") from None
        chunks += chunk_by_words(text, cfg.chunk_words) if cfg.chunk_words > 0 else [" ".join(text.split())]
    return [c for c in chunks if c]


def _pg19_chunks(cfg: DatasetConfig) -> list[str]:
    """The reference's chunks: `yurakuratov/pg19_valid_1k_chunks` (one `text` column, split `train`) from
    the hub, or a local copy: a directory in the hub's layout (`data/train-*.parquet`, as
    `huggingface-cli download --repo-type dataset` leaves it), a `save_to_disk` directory, or one
    .parquet / .csv / .jsonl file (e.g. the reference's `pg19_valid_1k_chunks.csv`)."""
    try:
        import datasets
    except ImportError:
        raise UserError("dataset pg19 needs the `datasets` package: pip install 'cram-sweep[hub]'") from None
    path = Path(cfg.path).expanduser()
    kinds = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
    local = "a directory in the hub's layout (data/train-*.parquet) or one .parquet/.csv/.jsonl file"
    try:
        if path.is_file():
            if path.suffix not in kinds:
                raise UserError(f"datasets.pg19.path={cfg.path!r} is not a .parquet/.csv/.jsonl file: give {local}")
            table = datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
        elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                table = table[cfg.split]
        elif path.is_dir():  # the split comes from the file names (datasets reads "valid" in a name as validation)
            splits = datasets.load_dataset(str(path))
            if cfg.split not in splits and len(splits) != 1:
                raise UserError(f"datasets.pg19.path={cfg.path!r} has splits {sorted(splits)}, not {cfg.split!r}: set datasets.pg19.split")
            table = splits[cfg.split] if cfg.split in splits else next(iter(splits.values()))
        else:
            table = datasets.load_dataset(cfg.path, split=cfg.split)
    except UserError:
        raise
    except Exception as err:  # the hub being unreachable surfaces as several exception types
        why = f"{type(err).__name__}: {one_line(err, 150)}"
        if path.exists():
            raise UserError(f"cannot read pg19 from {cfg.path!r} (split {cfg.split!r}; {why}): give {local}") from None
        raise UserError(
            f"cannot load pg19 from {cfg.path!r} ({why}): where the hub is unreachable, set datasets.pg19.path to {local}"
        ) from None
    if cfg.text_field not in table.column_names:
        raise UserError(f"pg19 data has no column {cfg.text_field!r} (has {table.column_names}): set datasets.pg19.text_field")
    return [text for text in table[cfg.text_field] if isinstance(text, str) and text.strip()]


def _word_list(cfg: DatasetConfig, tokenizer) -> list[str]:
    if cfg.path:
        try:
            words = Path(cfg.path).read_text(encoding="utf-8").split()
        except OSError as err:
            raise UserError(f"cannot read the word list datasets.random.path={cfg.path!r}: {err.strerror}") from None
        return sorted(set(words))
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = {tokenizer.convert_tokens_to_string([t]).strip() for t in vocab if t}
    return sorted(w for w in words if w.isalpha() and w.isascii() and len(w) > 1)


def sample_texts(cfg: DatasetConfig, tokenizer, count: int, seed: int) -> list[str]:
    """The first `count` texts of a dataset."""
    if cfg.source == "random":
        words = _word_list(cfg, tokenizer)
        if not words:
            raise UserError("the random dataset's word list is empty: set datasets.random.path to a word-list file")
        return [" ".join(random.Random(f"{seed}|{i}").choices(words, k=cfg.num_words)) for i in range(count)]
    chunks = _natural_chunks(cfg)
    if len(chunks) < count:
        raise UserError(f"the dataset has {len(chunks)} texts but grid.samples={count}: lower grid.samples")
    return chunks[:count]


def sample_token_ids(cfg: DatasetConfig, name: str, tokenizer, count: int, length: int, seed: int) -> dict[int, list[int]]:
    """Token ids of samples 0..count-1, each exactly `length` tokens (default special tokens included)."""
    ids = {}
    for i, text in enumerate(sample_texts(cfg, tokenizer, count, seed)):
        tokens = tokenizer(text)["input_ids"]
        if len(tokens) < length:
            raise UserError(
                f"sample {i} of dataset {name} has {len(tokens)} tokens, fewer than grid.lengths max {length}: "
                f"lower grid.lengths or use longer texts (datasets.{name}.chunk_words)"
            )
        ids[i] = tokens[:length]
    return ids
