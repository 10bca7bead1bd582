"""Task data from a spec: local files and folders, `datasets` hub names, `pkg:` and `synthetic:`.

Every source ends in `make_text_data`, which drops empty texts, maps labels to class ids,
checks the data is usable for the task and fingerprints its content (not its spec, so the same
texts read from a CSV or a JSONL file share one fingerprint).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lfdist.constants import TASKS
from lfdist.errors import UserError

FILE_KINDS = (".txt", ".jsonl", ".csv")
FOLDER_TEXT_SUFFIXES = (".txt", ".rst", ".md")
_INT = re.compile(r"-?\d+")
_NOT_TEXT_SHARE = 0.1  # more undecodable bytes than this and a "text" file is binary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextData:
    texts: tuple[str, ...]
    labels: tuple[int, ...] | None  # None for task "lm"
    label_names: tuple[str, ...] | None
    fingerprint: str  # sha256 over content (texts + labels), independent of the spec

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def subset(self, indices: Iterable[int]) -> TextData:
        """The examples at `indices`, in that order, with their own fingerprint."""
        idx = list(indices)
        texts = tuple(self.texts[i] for i in idx)
        labels = None if self.labels is None else tuple(self.labels[i] for i in idx)
        return TextData(
            texts, labels, self.label_names, fingerprint(texts, labels, self.label_names)
        )


def fingerprint(
    texts: Sequence[str], labels: Sequence[int] | None, label_names: Sequence[str] | None
) -> str:
    h = hashlib.sha256()
    for text in texts:  # length-prefixed, so no two different lists hash the same bytes
        raw = text.encode("utf-8", errors="surrogatepass")
        h.update(len(raw).to_bytes(8, "little") + raw)
    if labels is not None:
        h.update(b"labels:" + ",".join(map(str, labels)).encode())
        h.update(b"names:" + json.dumps(list(label_names or ())).encode())
    return h.hexdigest()


def make_text_data(
    texts: Sequence,
    labels: Sequence | None,
    task: str,
    where: str,
    label_names: Sequence[str] | None = None,
) -> TextData:
    """Validated TextData for `task` from raw texts and raw labels (names or ints)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(
                f"{where}: text {i} is {type(text).__name__} {text!r}, not text; "
                "point the text column at a column of strings"
            )
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        raise UserError(
            f"{where} holds no text (0 non-empty texts); give data with at least one non-empty text"
        )
    texts = tuple(texts[i] for i in keep)
    if task == "lm":
        return TextData(texts, None, None, fingerprint(texts, None, None))
    if labels is None:
        raise UserError(
            f"{where} has no labels, but task 'classify' needs them; give labelled data "
            "(a label column, or <folder>/<label>/*.txt) or use task 'lm'"
        )
    ids, names, mapped = _class_ids([labels[i] for i in keep], where, label_names)
    if len(set(ids)) < 2:
        raise UserError(
            f"{where} has a single class ({names[ids[0]]!r}); classification needs "
            "at least 2 classes: check the label column"
        )
    if mapped and (where, names) not in _SAID:  # once per data, however often it is read
        _SAID.add((where, names))
        log.info("%s", mapped)
    return TextData(texts, ids, names, fingerprint(texts, ids, names))


_SAID: set = set()  # label mappings already reported in this process


def _class_ids(
    raw: list, where: str, names: Sequence[str] | None
) -> tuple[tuple[int, ...], tuple[str, ...], str | None]:
    """Class ids, class names, and the line that says how names were mapped (None: ids as
    given)."""
    for i, value in enumerate(raw):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{where}: example {i} has no label; give every example a label")
        if not isinstance(value, (str, int, float)):  # bool is an int
            raise UserError(
                f"{where}: example {i} has the label {value!r}, a {type(value).__name__}; a label "
                "must be a class name or a class id"
            )
        if isinstance(value, float) and value.is_integer():
            raw[i] = int(value)
    if names is not None:  # class ids given with their names (a hub ClassLabel)
        bad = [v for v in raw if not isinstance(v, int) or not 0 <= v < len(names)]
        if bad:
            raise UserError(
                f"{where}: label {bad[0]!r} is not a class id of {list(names)}; "
                "drop unlabelled examples (label -1) or use a labelled split"
            )
        return tuple(raw), tuple(names), None
    # CSV cells are strings: "0"/"1" are class ids.
    raw = [int(v) if isinstance(v, str) and _INT.fullmatch(v.strip()) else v for v in raw]
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    if ints and min(raw) >= 0 and max(raw) < 2 * len(set(raw)):
        # Dense integer class ids keep their meaning: class k stays id k.
        return tuple(raw), tuple(str(k) for k in range(max(raw) + 1)), None
    # Other values (strings, sparse ints like years) are names, in sorted order.
    names = [str(v) for v in sorted(set(raw))] if ints else sorted({str(v) for v in raw})
    index = {name: k for k, name in enumerate(names)}
    shown = ", ".join(f"{n!r}={k}" for k, n in enumerate(names[:8]))
    more = f", ... ({len(names)} classes)" if len(names) > 8 else ""
    mapped = f"{where}: labels are class names; mapped to ids in sorted order: {shown}{more}"
    return tuple(index[str(v)] for v in raw), tuple(names), mapped


def load_text_data(
    spec: str, task: str, text_column: str = "text", label_column: str = "label"
) -> TextData:
    """Read the data named by `spec` for `task` ("lm" or "classify")."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    if spec.startswith("synthetic:"):
        from lfdist.data.synthetic import synthetic_data

        return synthetic_data(spec, task)
    if spec.startswith("pkg:"):
        from lfdist.data.packaged import packaged_data

        return packaged_data(spec[4:], task)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _read_folder(path, task)
    if os.path.isfile(path):
        return _read_file(path, task, text_column, label_column)
    if os.path.islink(path):  # a link that leads nowhere is a local path, not a hub name
        _refuse_bad_link(path)
    if (
        spec.startswith((".", "/", "~"))
        or spec.lower().endswith(FILE_KINDS + (".json", ".tsv"))
        or spec.count("/") > 1
    ):
        raise UserError(
            f"data path {spec!r} does not exist; give an existing file "
            f"({', '.join(FILE_KINDS)}) or folder, a hub dataset, pkg:<name> or synthetic:lm"
        )
    from lfdist.data.hub import read_hub

    return read_hub(spec, task, text_column, label_column)


def _refuse_bad_link(path: str) -> None:
    try:
        os.stat(path)
    except OSError as e:
        what = "a symlink loop" if e.errno == errno.ELOOP else "a symlink to a missing target"
        raise UserError(
            f"data path {path!r} is {what}; point --data at a real file or folder"
        ) from None
    raise UserError(f"data path {path!r} is neither a file nor a folder; give a file or folder")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop inside a data folder is not a class folder
        return False


def read_text_file(path: str) -> str:
    """A text file's content, refusing binary files (NUL bytes or mostly undecodable bytes)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(
            f"cannot read {path} ({e.strerror or e}); fix or remove it from the data"
        ) from None
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if b"\0" in raw or bad > _NOT_TEXT_SHARE * max(1, len(text)):
        raise UserError(
            f"{path} is not text (binary bytes: NUL or mostly not UTF-8); give a UTF-8 text file"
        )
    return text


def _read_file(path: str, task: str, text_column: str, label_column: str) -> TextData:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        if task == "classify":
            raise UserError(
                f"{path}: a .txt file has no labels, so it cannot be classify data; use "
                "a .csv/.jsonl file with a label column or <folder>/<label>/*.txt"
            )
        return make_text_data(split_paragraphs(read_text_file(path)), None, task, path)
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents
            rows = list(csv.DictReader(f))
    else:
        raise UserError(
            f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_KINDS)} "
            "or a folder"
        )
    if not rows:
        raise UserError(f"{path} holds no rows; give a file with at least one example")
    return from_columns(_rows_to_columns(rows), task, text_column, label_column, path)


def split_paragraphs(text: str) -> list[str]:
    """Documents of a .txt file: paragraphs separated by blank lines."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno}); "
                    "fix or remove that line (one JSON object per line)"
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path}:{lineno}: a JSONL line must be an object like "
                    f'{{"text": ...}}, got {type(row).__name__}; fix that line'
                )
            rows.append(row)
    return rows


def _rows_to_columns(rows: list[dict]) -> dict[str, list]:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {name: [row.get(name) for row in rows] for name in names}


def from_columns(
    columns: dict[str, Sequence],
    task: str,
    text_column: str,
    label_column: str,
    where: str,
    label_names: Sequence[str] | None = None,
) -> TextData:
    found = ", ".join(map(str, columns)) or "none"
    if text_column not in columns:
        only_labels = task == "lm" and list(columns) == [label_column]
        what = (
            "only labels, no text, and task 'lm' needs text"
            if only_labels
            else f"no text column {text_column!r}"
        )
        raise UserError(
            f"{where} has {what} (columns found: {found}); set the text column to "
            "the column that holds the text"
        )
    texts = ["" if t is None else t for t in columns[text_column]]
    labels = None
    if task == "classify":
        if label_column not in columns:
            raise UserError(
                f"{where} has no label column {label_column!r} (columns found: {found}); "
                "set the label column to the column that holds the class"
            )
        labels = list(columns[label_column])
    return make_text_data(texts, labels, task, where, label_names)


def _read_folder(path: str, task: str) -> TextData:
    subdirs = sorted(e.name for e in os.scandir(path) if _is_dir(e) and not e.name.startswith("."))
    labelled = [d for d in subdirs if _files(os.path.join(path, d), (".txt",), recursive=False)]
    if task == "classify":
        if not labelled:
            raise UserError(
                f"{path}: classify data in a folder must be <folder>/<label>/*.txt "
                "(one sub-folder per class); none found"
            )
        texts, labels = [], []
        for label in labelled:
            for file in _files(os.path.join(path, label), (".txt",), recursive=False):
                texts.append(_read_text(file))
                labels.append(label)
        return make_text_data(texts, labels, task, path)
    files = _files(path, FOLDER_TEXT_SUFFIXES, recursive=True)
    if not files:
        raise UserError(
            f"{path} holds no {'/'.join(FOLDER_TEXT_SUFFIXES)} files; give a folder of text files"
        )
    return make_text_data([_read_text(f) for f in files], None, task, path)


def _files(folder: str, suffixes: tuple[str, ...], recursive: bool) -> list[str]:
    """Files under `folder` with one of `suffixes`, sorted by path for determinism."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [
            os.path.join(root, n)
            for n in names
            if n.lower().endswith(suffixes) and not n.startswith(".")
        ]
        if not recursive:
            break
    return sorted(out)


def _read_text(path: str) -> str:
    return read_text_file(path).strip()
