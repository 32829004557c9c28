"""Local data loaders: text classification, instruction pairs and plain text.

Every loader reads a local file (JSON Lines, CSV/TSV, or plain text), checks
it, tokenises it once and returns a :class:`TokenizedDataset` whose items are
dicts of tensors. Padding happens per batch in :func:`pad_collate`, so short
batches stay short.

Errors name the file and line of a bad row and the column that is missing,
so a user can fix their file without reading this code.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100  # positions the loss must skip (Hugging Face convention)

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataError(ValueError):
    """A data file does not have the shape a loader needs."""


@dataclass(frozen=True)
class Record:
    """One row of a data file, with where it came from (for error messages)."""

    fields: dict[str, Any]
    source: str  # "file:line"


# --------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike, *, encoding: str = "utf-8") -> list[Record]:
    """Read a JSON Lines, JSON array, CSV or TSV file into records.

    Each record remembers ``file:line`` so later checks can point at the row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in TABLE_SUFFIXES:
            return _read_table(path, delimiter="\t" if suffix == ".tsv" else ",", encoding=encoding)
        if suffix in JSON_SUFFIXES:
            return _read_json(path, encoding=encoding)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not valid {encoding} text ({error.reason} at byte {error.start}); "
            f"pass the file's encoding, e.g. encoding='latin-1'"
        ) from error
    raise DataError(
        f"unsupported data file type {suffix!r} for {path}; "
        f"use one of {', '.join(JSON_SUFFIXES + TABLE_SUFFIXES)}"
    )


def _read_table(path: Path, *, delimiter: str, encoding: str) -> list[Record]:
    with path.open(encoding=encoding, newline="") as handle:
        return read_table_stream(handle, str(path), delimiter=delimiter)


def read_table_stream(handle: Iterable[str], name: str, *, delimiter: str = ",") -> list[Record]:
    """Records of a CSV/TSV text stream with a header row; ``name`` is used in errors."""
    reader = csv.DictReader(handle, delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{name} is empty: expected a header row naming the columns")
    records = []
    line = 2  # the header is line 1; a quoted field may span several lines
    for row in reader:
        if None in row:
            raise DataError(
                f"{name}:{line}: row has more fields than the header "
                f"({len(reader.fieldnames)} columns: {', '.join(reader.fieldnames)})"
            )
        records.append(Record(dict(row), f"{name}:{line}"))
        line = reader.line_num + 1
    return records


def _read_json(path: Path, *, encoding: str) -> list[Record]:
    text = path.read_text(encoding=encoding)
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        return [_json_record(row, f"{path}:item {index}") for index, row in enumerate(rows)]
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        records.append(_json_record(row, f"{path}:{line_number}"))
    return records


def _json_record(row: Any, source: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object with named fields, got {type(row).__name__}")
    return Record(row, source)


def require_columns(records: Sequence[Record], columns: Iterable[str], path: str | os.PathLike) -> None:
    """Fail early, naming the missing column and the columns that do exist."""
    if not records:
        raise DataError(f"{path} has no rows")
    for column in columns:
        for record in records:
            if column not in record.fields:
                available = ", ".join(sorted(record.fields)) or "(none)"
                raise DataError(
                    f"{record.source}: missing column {column!r} (columns present: {available}); "
                    f"choose the column with the matching *_column option"
                )


def text_field(record: Record, column: str) -> str:
    value = record.fields[column]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{record.source}: column {column!r} must be non-empty text, got {value!r}")
    return value


# --------------------------------------------------------------------------- labels


def labels_to_ids(
    records: Sequence[Record], label_column: str, label_names: Sequence[str] | None = None
) -> tuple[list[int], list[str]]:
    """Map labels (strings or integer ids) to ids, returning ``(ids, label_names)``.

    With ``label_names`` given (e.g. from the training file) every label must
    be one of those names or a valid index into them. Without it, integer
    labels are used as they are and string labels are numbered in sorted order.
    """
    raw = [record.fields[label_column] for record in records]
    if label_names is None:
        if all(_as_int(value) is not None for value in raw):
            ids = [_as_int(value) for value in raw]
            negative = next((r for r, i in zip(records, ids) if i < 0), None)
            if negative is not None:
                raise DataError(f"{negative.source}: label ids must be >= 0, got {negative.fields[label_column]!r}")
            return ids, [str(i) for i in range(max(ids) + 1)]
        label_names = sorted({str(value).strip() for value in raw})
    name_to_id = {name: index for index, name in enumerate(label_names)}
    ids = []
    for record, value in zip(records, raw):
        label_id = name_to_id.get(str(value).strip())
        if label_id is None:
            as_int = _as_int(value)
            if as_int is not None and 0 <= as_int < len(label_names):
                label_id = as_int
        if label_id is None:
            raise DataError(
                f"{record.source}: unknown label {value!r} in column {label_column!r}; "
                f"valid labels: {', '.join(label_names)}"
            )
        ids.append(label_id)
    return ids, list(label_names)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


# --------------------------------------------------------------------------- datasets


class TokenizedDataset(Dataset):
    """A list of examples (dicts of tensors) plus the collate function that batches them."""

    def __init__(self, examples: list[dict[str, torch.Tensor]], collate_fn: Callable[[list[dict]], dict]):
        self.examples = examples
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]

    def subset(self, limit: int | None) -> "TokenizedDataset":
        if limit is None or limit >= len(self.examples):
            return self
        return TokenizedDataset(self.examples[:limit], self.collate_fn)


def pad_collate(examples: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Batch examples, padding variable-length fields to the longest in the batch.

    ``input_ids`` pad with ``pad_token_id``, ``labels`` with -100 (ignored by
    the loss), everything else (attention masks, token types) with 0.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        pad_value = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        longest = max(value.shape[0] for value in values)
        padded = values[0].new_full((len(values), longest), pad_value)
        for row, value in enumerate(values):
            padded[row, : value.shape[0]] = value
        batch[key] = padded
    return batch


class PadCollator:
    """Picklable ``pad_collate`` bound to a pad id (usable by DataLoader workers and HF Trainer)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pad_collate(examples, self.pad_token_id)


def pad_token_id_of(tokenizer: Any) -> int:
    """The id used for padding; causal LMs often have none, so fall back to EOS (masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[dict[str, torch.Tensor]]:
    """Tokenise without padding (padding is per batch), truncating to ``max_length``."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
    return [
        {key: torch.tensor(encoded[key][index], dtype=torch.long) for key in keys}
        for index in range(len(texts))
    ]


def classification_dataset(
    tokenizer: Any, texts: Sequence[str], label_ids: Sequence[int], max_length: int
) -> TokenizedDataset:
    examples = encode_texts(tokenizer, texts, max_length)
    for example, label in zip(examples, label_ids):
        example["labels"] = torch.tensor(label, dtype=torch.long)
    return TokenizedDataset(examples, PadCollator(pad_token_id_of(tokenizer)))


@dataclass
class ClassificationData:
    texts: list[str]
    label_ids: list[int]
    label_names: list[str]


def load_classification_file(
    path: str | os.PathLike,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    encoding: str = "utf-8",
) -> ClassificationData:
    """Read (text, label) rows; pass the training file's ``label_names`` when reading a test file."""
    records = read_records(path, encoding=encoding)
    require_columns(records, [text_column, label_column], path)
    texts = [text_field(record, text_column) for record in records]
    ids, names = labels_to_ids(records, label_column, label_names)
    return ClassificationData(texts, ids, names)


def load_classification_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    max_length: int = 128,
    encoding: str = "utf-8",
) -> tuple[TokenizedDataset, list[str]]:
    """Tokenised classification dataset and the label names (index = label id)."""
    data = load_classification_file(
        path, text_column=text_column, label_column=label_column, label_names=label_names, encoding=encoding
    )
    return classification_dataset(tokenizer, data.texts, data.label_ids, max_length), data.label_names


# --------------------------------------------------------------------------- instruction pairs


def encode_instruction(tokenizer: Any, prompt: str, response: str, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids for one (prompt, response) pair with the loss on the response only.

    Uses the tokenizer's chat template when it has one, else ``prompt\\nresponse<eos>``.
    When too long, the prompt loses its *start* first (its end carries the
    assistant marker) and the response keeps at least half the budget, so
    every example still has response tokens to learn from.
    """
    prompt_ids, response_ids = _instruction_parts(tokenizer, prompt, response)
    response_budget = max(max_length - len(prompt_ids), max_length // 2)
    response_ids = response_ids[:response_budget]
    overflow = len(prompt_ids) + len(response_ids) - max_length
    if overflow > 0:
        prompt_ids = prompt_ids[overflow:]
    input_ids = torch.tensor(prompt_ids + response_ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def instruction_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids a model sees before it answers `prompt` (chat template with the assistant
    marker, or ``prompt\n``): what generation starts from, as in training."""
    return _instruction_parts(tokenizer, prompt, "")[0]


def _instruction_parts(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full_text.startswith(prompt_text):
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
            return list(prompt_ids), list(response_ids)
        # A template that rewrites earlier turns cannot be split as a prefix; fall through.
    prompt_ids = tokenizer(prompt + "\n")["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = list(response_ids) + [tokenizer.eos_token_id]
    return list(prompt_ids), list(response_ids)


def instruction_dataset(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int
) -> TokenizedDataset:
    examples = [encode_instruction(tokenizer, prompt, response, max_length) for prompt, response in pairs]
    return TokenizedDataset(examples, PadCollator(pad_token_id_of(tokenizer)))


def load_instruction_pairs(
    path: str | os.PathLike,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    encoding: str = "utf-8",
) -> list[tuple[str, str]]:
    records = read_records(path, encoding=encoding)
    require_columns(records, [prompt_column, response_column], path)
    return [(text_field(record, prompt_column), text_field(record, response_column)) for record in records]


def load_instruction_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    max_length: int = 512,
    encoding: str = "utf-8",
) -> TokenizedDataset:
    pairs = load_instruction_pairs(
        path, prompt_column=prompt_column, response_column=response_column, encoding=encoding
    )
    return instruction_dataset(tokenizer, pairs, max_length)


# --------------------------------------------------------------------------- plain text


def load_text_documents(
    path: str | os.PathLike, *, text_column: str = "text", encoding: str = "utf-8"
) -> list[str]:
    """Documents from a .txt/.md file (one document), or one per row of a JSONL/CSV file."""
    path = Path(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        text = path.read_text(encoding=encoding)
        if not text.strip():
            raise DataError(f"{path} is empty")
        return [text]
    records = read_records(path, encoding=encoding)
    require_columns(records, [text_column], path)
    return [text_field(record, text_column) for record in records]


def pack_token_blocks(tokenizer: Any, documents: Sequence[str], block_size: int) -> list[list[int]]:
    """Concatenate documents (EOS, else SEP, between them) and cut into ``block_size`` blocks.

    The tail shorter than a block is dropped, unless it is all there is.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    separator_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    separator = [separator_id] if separator_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.extend(separator)
    blocks = [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks and len(stream) >= 2:
        blocks = [stream]
    return blocks


def causal_lm_dataset(blocks: Sequence[Sequence[int]], pad_token_id: int) -> TokenizedDataset:
    examples = []
    for block in blocks:
        input_ids = torch.tensor(block, dtype=torch.long)
        examples.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
        )
    return TokenizedDataset(examples, PadCollator(pad_token_id))


def load_text_dataset(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    text_column: str = "text",
    block_size: int = 256,
    encoding: str = "utf-8",
) -> TokenizedDataset:
    documents = load_text_documents(path, text_column=text_column, encoding=encoding)
    blocks = pack_token_blocks(tokenizer, documents, block_size)
    if not blocks:
        raise DataError(f"{path}: not enough text for one block of {block_size} tokens")
    return causal_lm_dataset(blocks, pad_token_id_of(tokenizer))


# --------------------------------------------------------------------------- per-process cache

_TOKENIZED: dict[tuple, Any] = {}


def tokenizer_key(tokenizer: Any) -> tuple:
    """Identify a tokenizer well enough to share tokenised data between models of one family."""
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    """Tokenise once per process: compare runs several methods on the same data."""
    if key not in _TOKENIZED:
        _TOKENIZED[key] = build()
    return _TOKENIZED[key]
