"""Dataset specs and token batches."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from posttrain_probe import ProbeError
from posttrain_probe.data import (
    load_dataset_spec,
    load_rows,
    n_batches,
    render_document,
    text_column,
    token_batches,
)
from posttrain_probe.synthetic import arithmetic_dataset


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_load_as_documents(tmp_path, suffix):
    texts = [f"document number {i} says {i * 7}" for i in range(5)]
    path = tmp_path / f"docs{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    else:
        table = datasets.Dataset.from_dict({"text": texts})
        {".json": table.to_json, ".parquet": table.to_parquet, ".csv": table.to_csv}[suffix](str(path))
    dataset = load_dataset_spec(str(path))
    assert dataset["text"] == texts
    assert load_dataset_spec(str(path), n_docs=2)["text"] == texts[:2]


def test_jsonl_with_n_docs_reads_only_its_first_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "id": i, "score": i / 2} for i in range(20)]
    path = tmp_path / "big.jsonl"
    # a broken line after the rows asked for: never read, where datasets would convert (and fail on) the whole file
    path.write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n\n{not json\n")
    head = load_dataset_spec(str(path), n_docs=4)
    (tmp_path / "four.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]))
    reference = datasets.load_dataset("json", data_files=str(tmp_path / "four.jsonl"), split="train")
    assert head.to_list() == reference.to_list() == rows[:4]
    assert head.features == reference.features
    assert len(load_dataset_spec(str(path), n_docs=10)) == 10
    with pytest.raises(ProbeError, match=r"big\.jsonl line 12 is not valid JSON .*expected one JSON object per line"):
        load_dataset_spec(str(path), n_docs=11)
    # rows that are not objects go to datasets, which names its own problem
    (tmp_path / "strings.jsonl").write_text('"a"\n"b"\n')
    with pytest.raises(ProbeError, match="cannot load dataset"):
        load_dataset_spec(str(tmp_path / "strings.jsonl"), n_docs=1)


def test_load_rows_gives_what_the_dataset_gives(tmp_path):
    """load_rows reads a .jsonl head straight into dicts: the same rows and columns as load_dataset_spec's Dataset,
    also where later rows miss a key or add one; other specs and formatted datasets go through the Dataset."""
    rows = [{"text": f"doc {i}", "id": i} for i in range(6)]
    rows[3] = {"id": 3}  # missing "text": None, as in the Dataset
    rows[4] = {"id": 4, "text": "doc 4", "extra": 1.5}  # an extra key and another order: the first row's columns
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    got, columns = load_rows(str(path), n_docs=6)
    expected = load_dataset_spec(str(path), n_docs=6)
    assert got == expected.to_list() and columns == expected.column_names == ["text", "id"]
    assert got[3] == {"text": None, "id": 3} and list(got[4]) == ["text", "id"]
    assert load_rows(str(path), n_docs=2)[0] == rows[:2]
    with pytest.raises(ProbeError, match=r"rows\.jsonl line 7 is not valid JSON"):
        load_rows(str(path), n_docs=7)
    with pytest.raises(ProbeError, match="n_docs must be >= 1, got 0"):
        load_rows(str(path), n_docs=0)
    (tmp_path / "mixed.jsonl").write_text('{"text": "a", "id": 1}\n{"text": "b", "id": "x"}\n')
    assert load_rows(str(tmp_path / "mixed.jsonl"), n_docs=2)[0][1] == {
        "text": "b",
        "id": "x",
    }  # JSON values as written
    (tmp_path / "blank.jsonl").write_text("{}\n{}\n")
    with pytest.raises(ProbeError, match=r"blank\.jsonl: its first row is \{\}: expected JSON objects with"):
        load_rows(str(tmp_path / "blank.jsonl"), n_docs=2)
    synthetic, names = load_rows("synthetic:arithmetic", n_docs=3)
    assert synthetic == load_dataset_spec("synthetic:arithmetic", n_docs=3).to_list() and "text" in names
    formatted = datasets.Dataset.from_dict({"x": [[1.0, 2.0]], "t": ["a"]}).with_format("numpy")
    (row,), names = load_rows(formatted)
    assert names == ["x", "t"] and type(row["x"]).__name__ == "ndarray"  # the rows the format yields


def test_folder_lists_and_synthetic_specs(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text("\n".join(json.dumps({"content": f"row {i}"}) for i in range(3)))
    folder = load_dataset_spec(str(tmp_path / "folder"))  # the `datasets` loader path used for hub names
    assert text_column(folder) == "content" and len(folder) == 3
    assert load_dataset_spec(["a b", "c d"])["text"] == ["a b", "c d"]
    synthetic = load_dataset_spec("synthetic:arithmetic", n_docs=10)
    assert len(synthetic) == 10 and "\\boxed{" in synthetic[0]["text"]
    assert text_column(synthetic) == "text" and text_column(synthetic, "messages") == "messages"
    with pytest.raises(ProbeError, match="column 'body' is not in the dataset"):
        text_column(synthetic, "body")
    with pytest.raises(ProbeError, match="is empty"):
        load_dataset_spec([])
    with pytest.raises(ProbeError, match="unsupported dataset file .*\\.xml"):
        (tmp_path / "x.xml").write_text("<a/>")
        load_dataset_spec(str(tmp_path / "x.xml"))


def test_chat_messages_render_through_the_chat_template(tokenizer):
    messages = arithmetic_dataset(1)[0]["messages"]
    text = render_document(messages, tokenizer)
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text
    batch = next(token_batches(arithmetic_dataset(3), tokenizer, column="messages", seq_len=512, batch_size=3))
    # chat text carries its own special tokens: no BOS added in front of <|im_start|>
    assert batch.input_ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ProbeError, match="cannot turn a int"):
        render_document(3, tokenizer)


def test_token_batches_pad_right_truncate_and_skip(tokenizer):
    data = arithmetic_dataset(10)
    batches = list(token_batches(data, tokenizer, seq_len=16, batch_size=4))
    assert len(batches) == n_batches(data, 4) == 3
    first = batches[0]
    assert first.input_ids.shape[1] <= 16 and first.input_ids.dtype == torch.long
    assert (first.input_ids[:, 0] == tokenizer.bos_token_id).all()  # plain text gets BOS
    lengths = first.attention_mask.sum(1)
    for row, length in enumerate(lengths):
        assert first.attention_mask[row, :length].all() and not first.attention_mask[row, length:].any()
        assert (first.input_ids[row, length:] == tokenizer.pad_token_id).all()
    assert batches[2].doc_ids.tolist() == [8, 9]
    skipped = list(token_batches(data, tokenizer, seq_len=16, batch_size=4, start_batch=2))
    assert len(skipped) == 1 and torch.equal(skipped[0].input_ids, batches[2].input_ids)
    with pytest.raises(ProbeError, match="batch_size must be >= 1"):
        next(token_batches(data, tokenizer, batch_size=0))
