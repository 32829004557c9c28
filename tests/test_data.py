"""Local data loaders: reading, label mapping, errors naming file:line, tokenisation and collation."""

from __future__ import annotations

import json

import pytest
import torch

from deltatune.train.data import (
    IGNORE_INDEX,
    DataError,
    encode_instruction,
    load_classification_dataset,
    load_classification_file,
    load_instruction_dataset,
    load_text_dataset,
    pack_token_blocks,
    pad_collate,
    read_records,
)
from deltatune.train.models import minilm_dir

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_csv_and_jsonl_records_remember_their_line(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"multi\nline",pos\nplain,neg\n', encoding="utf-8")
    records = read_records(csv_path)
    assert [r.fields["text"] for r in records] == ["multi\nline", "plain"]
    assert [r.source for r in records] == [f"{csv_path}:2", f"{csv_path}:4"]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}])
    assert read_records(jsonl)[0].source == f"{jsonl}:1"


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": 0}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_records(path)


def test_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "hi", "label": "pos"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing column 'text' \(columns present: label, sentence\)"):
        load_classification_file(path)


def test_empty_text_points_at_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\n   ,neg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:3: column 'text' must be non-empty"):
        load_classification_file(path)


def test_string_labels_are_numbered_and_test_files_reuse_the_names(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": l} for t, l in
                                                   [("a", "pos"), ("b", "neg"), ("c", "neutral"), ("d", "pos")]])
    data = load_classification_file(train)
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.label_ids == [2, 0, 1, 2]
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "e", "label": "neutral"}, {"text": "f", "label": "meh"}])
    with pytest.raises(DataError, match=r"test\.jsonl:2: unknown label 'meh'.*valid labels: neg, neutral, pos"):
        load_classification_file(test, label_names=data.label_names)


def test_integer_labels_are_kept_as_ids(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,2\nb,0\n", encoding="utf-8")
    data = load_classification_file(path)
    assert data.label_ids == [2, 0] and data.label_names == ["0", "1", "2"]


def test_wrong_encoding_suggests_the_fix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match="encoding='latin-1'"):
        read_records(path)
    assert read_records(path, encoding="latin-1")[0].fields["text"] == "caf\xe9"


def test_unsupported_suffix_lists_the_supported_ones(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"\.jsonl.*\.csv"):
        read_records(path)


def test_classification_dataset_tokenises_truncates_and_pads_per_batch(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "short", "label": "a"},
        {"text": "a much longer sentence with quite a few more words in it", "label": "b"},
    ])
    dataset, names = load_classification_dataset(path, tokenizer, max_length=8)
    assert names == ["a", "b"] and len(dataset) == 2
    assert len(dataset[0]["input_ids"]) == 3 and len(dataset[1]["input_ids"]) == 8
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["input_ids"][0, 3:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1]
    short_only = dataset.collate_fn([dataset[0]])
    assert short_only["input_ids"].shape == (1, 3)  # dynamic padding: no padding to max_length


def test_pad_collate_pads_labels_with_ignore_index():
    batch = pad_collate([
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_instruction_loss_covers_only_the_response_plain_format(tokenizer):
    example = encode_instruction(tokenizer, "what is two plus two", "four", max_length=64)
    labels, ids = example["labels"], example["input_ids"]
    response = tokenizer("four", add_special_tokens=False)["input_ids"]
    expected = response + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    assert ids[labels != IGNORE_INDEX].tolist() == expected
    # Everything before the response is prompt, and masked.
    first_label = int((labels != IGNORE_INDEX).nonzero()[0])
    assert (labels[:first_label] == IGNORE_INDEX).all() and first_label >= 5


def test_instruction_uses_the_chat_template_when_there_is_one(tokenizer):
    tokenizer = __import__("copy").deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    example = encode_instruction(tokenizer, "hello there", "general kenobi", max_length=64)
    decoded_prompt = tokenizer.decode(example["input_ids"][example["labels"] == IGNORE_INDEX])
    decoded_response = tokenizer.decode(example["input_ids"][example["labels"] != IGNORE_INDEX])
    assert "user" in decoded_prompt and "assistant" in decoded_prompt and "hello there" in decoded_prompt
    assert decoded_response.startswith("general kenobi") and "hello" not in decoded_response


def test_long_instruction_keeps_response_tokens(tokenizer):
    example = encode_instruction(tokenizer, "word " * 100, "the answer is here", max_length=16)
    assert len(example["input_ids"]) == 16
    assert (example["labels"] != IGNORE_INDEX).sum() >= 4


def test_instruction_file_errors_name_the_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "answer": "yo"}])
    with pytest.raises(DataError, match="missing column 'response'"):
        load_instruction_dataset(path, tokenizer)
    dataset = load_instruction_dataset(path, tokenizer, response_column="answer")
    assert len(dataset) == 1


def test_text_packing_makes_full_blocks_with_separators(tmp_path, tokenizer):
    documents = ["one two three four five", "six seven eight nine ten eleven"]
    blocks = pack_token_blocks(tokenizer, documents, block_size=4)
    stream_length = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents)
    assert len(blocks) == stream_length // 4 and all(len(b) == 4 for b in blocks)
    assert tokenizer.sep_token_id in sum(blocks, [])  # BERT has no EOS: documents are split by SEP
    path = tmp_path / "book.txt"
    path.write_text(" ".join(["lorem ipsum dolor"] * 50), encoding="utf-8")
    dataset = load_text_dataset(path, tokenizer, block_size=16)
    assert all(ex["input_ids"].shape == (16,) and torch.equal(ex["labels"], ex["input_ids"]) for ex in dataset)


def test_text_rows_from_jsonl(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "some words here " * 5}])
    with pytest.raises(DataError, match="missing column 'text'"):
        load_text_dataset(path, tokenizer)
    assert len(load_text_dataset(path, tokenizer, text_column="body", block_size=8)) >= 2
