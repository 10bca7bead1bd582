"""Task data: read a data spec into TextData, split off held-out data, tokenize into tensors.

Data specs: a local .txt/.jsonl/.csv file or folder, a `datasets` hub name (`name[:config]`),
`pkg:bbc-news`, `pkg:python-docs`, `synthetic:lm[:N]`, `synthetic:classify[:N]`.
Importing this package does not import torch, transformers or datasets.
"""

from lfdist.data.sources import TextData, load_text_data
from lfdist.data.task import load_task_data, split_heldout
from lfdist.data.tokenize import IGNORE_INDEX, tokenize

__all__ = [
    "IGNORE_INDEX",
    "TextData",
    "load_task_data",
    "load_text_data",
    "split_heldout",
    "tokenize",
]
