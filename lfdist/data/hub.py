"""`datasets` hub names as data specs: `name[:config]`, train split.

Users with the hub get any dataset; here (no hub) the failure is one clean line.
"""

from __future__ import annotations

from lfdist.data.sources import TextData, from_columns
from lfdist.errors import UserError


def read_hub(spec: str, task: str, text_column: str, label_column: str) -> TextData:
    """`name[:config]` from the Hugging Face hub through `datasets` (train split)."""
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split="train")
    except ImportError:
        raise UserError(
            "hub datasets need the 'datasets' package; run 'pip install datasets'"
        ) from None
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"cannot load dataset {spec!r} from the Hugging Face hub ({first}); check the "
            "name and the network, or give a local file or folder, pkg:<name> or "
            "synthetic:lm"
        ) from None
    names = None
    feature = ds.features.get(label_column) if task == "classify" else None
    if feature is not None and hasattr(feature, "names"):  # a ClassLabel keeps its class names
        names = list(feature.names)
    if len(ds) == 0:
        raise UserError(f"dataset {spec!r} has an empty train split; give another dataset")
    columns = {
        name: list(ds[name]) for name in ds.column_names if name in (text_column, label_column)
    }
    columns.update({name: [] for name in ds.column_names if name not in columns})
    return from_columns(columns, task, text_column, label_column, f"dataset {spec!r}", names)
