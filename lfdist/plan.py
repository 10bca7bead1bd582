"""The plan: which blocks train and how, as a YAML file a person can read and edit.

A plan is bound to one model by its fingerprint (architecture, block count, hash of
parameter names and shapes); loading it against another model is an error naming both.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from lfdist.errors import UserError

TREATMENTS = ("frozen", "full", "bias", "lora", "mask")
MODULE_GROUPS = ("embeddings", "final_norm", "head")
DEFAULT_MODULES = {"embeddings": "frozen", "final_norm": "full", "head": "full"}
# A head that shares its weight with the input embeddings has no parameter of its own: it
# trains exactly when the embeddings do, so a plan records it as "tied", never "full".
TIED = "tied"


def default_modules(model_info: dict[str, Any]) -> dict[str, str]:
    """The default non-block treatments for a probed model (its head marked tied if it is)."""
    modules = dict(DEFAULT_MODULES)
    if head_is_tied(model_info):
        modules["head"] = TIED
    return modules


def head_is_tied(model_info: dict[str, Any]) -> bool:
    # Tied weights are counted once, under the embeddings: the LM head's own count is 0.
    return (
        model_info.get("task", "lm") == "lm"
        and model_info.get("group_params", {}).get("head", 0) == 0
        and bool(model_info.get("head_matmul_params"))
    )


def head_treatment(modules: dict[str, str]) -> str:
    """How the head trains, in words the plan table and the run summary print."""
    head = modules.get("head", "frozen")
    if head != TIED:
        return f"head {head}"
    if modules.get("embeddings") == "full":
        return "head: tied to the embeddings, trained with them"
    return "head: tied to the frozen embeddings, not trained"


PLAN_VERSION = 1


@dataclass(frozen=True)
class Fingerprint:
    architecture: str
    n_blocks: int
    params_hash: str

    def __post_init__(self):
        if isinstance(self.n_blocks, bool) or not isinstance(self.n_blocks, int):
            raise UserError(
                f"model fingerprint n_blocks must be a whole number of blocks, got "
                f"{self.n_blocks!r}; the file was edited: rewrite it with lfdist"
            )

    def short(self) -> str:
        return f"{self.architecture}/{self.n_blocks} blocks/{self.params_hash[:12]}"


@dataclass(frozen=True)
class BlockPlan:
    index: int
    name: str
    treatment: str
    score: float | None = None

    def __post_init__(self):
        if self.treatment not in TREATMENTS:
            raise UserError(
                f"block {self.index}: unknown treatment {self.treatment!r}; use one of {', '.join(TREATMENTS)}"
            )


@dataclass(frozen=True)
class Plan:
    strategy: str
    fingerprint: Fingerprint
    blocks: tuple[BlockPlan, ...]
    modules: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODULES))
    budget: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)  # curves the strategy used
    predicted: dict[str, Any] = field(default_factory=dict)  # cost model output
    options: dict[str, Any] = field(default_factory=dict)  # e.g. lora rank, lisa period

    def __post_init__(self):
        for group, treatment in self.modules.items():
            if group not in MODULE_GROUPS:
                raise UserError(
                    f"plan modules: unknown group {group!r}; use {', '.join(MODULE_GROUPS)}"
                )
            allowed = ("frozen", "full", TIED) if group == "head" else ("frozen", "full")
            if treatment not in allowed:
                raise UserError(
                    f"plan modules.{group}: treatment must be {' or '.join(allowed)}, "
                    f"got {treatment!r}"
                )
        if [b.index for b in self.blocks] != list(range(len(self.blocks))):
            raise UserError(
                "plan blocks must be listed in order 0..L-1 with no gaps; write the plan again "
                "with `lfdist select`"
            )
        if self.blocks:  # a name is the block at its index (model.layers.3 is index 3)
            path = self.block_path
            for b in self.blocks:
                if b.name != f"{path}.{b.index}":
                    raise UserError(
                        f"plan block {b.index} is named {b.name!r} but the block at index "
                        f"{b.index} is '{path}.{b.index}'; edit treatments, not names (restore "
                        "the name or rerun `lfdist select`)"
                    )
        if len(self.blocks) != self.fingerprint.n_blocks:
            raise UserError(
                f"plan lists {len(self.blocks)} blocks but its fingerprint says {self.fingerprint.n_blocks}"
            )

    @property
    def block_path(self) -> str:
        """The dotted name of the model's block list, e.g. model.layers ('' with no blocks)."""
        return self.blocks[0].name.rpartition(".")[0] if self.blocks else ""

    @property
    def treatments(self) -> list[str]:
        return [b.treatment for b in self.blocks]

    @property
    def trainable_blocks(self) -> list[int]:
        return [b.index for b in self.blocks if b.treatment != "frozen"]

    @property
    def boundary(self) -> int:
        """Index of the lowest trainable block (L when none trains): backward stops here."""
        trainable = self.trainable_blocks
        return trainable[0] if trainable else len(self.blocks)

    def check_model(self, fingerprint: Fingerprint) -> None:
        if fingerprint != self.fingerprint:
            raise UserError(
                f"plan was made for model {self.fingerprint.short()} but this model is "
                f"{fingerprint.short()}; run `lfdist probe` and `lfdist select` on this model"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks"] = [{k: v for k, v in b.items() if v is not None} for b in d["blocks"]]
        return {"version": PLAN_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict):
            raise UserError("plan file is not a mapping; write it with `lfdist select`")
        d = dict(d)
        version = d.pop("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise UserError(
                f"plan format version {version} is not supported (this lfdist reads {PLAN_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"plan has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        try:
            fp = Fingerprint(**d.pop("fingerprint"))
            blocks = tuple(BlockPlan(**b) for b in d.pop("blocks"))
        except (KeyError, TypeError) as e:
            raise UserError(
                f"plan is missing or has malformed fields ({e}); write it with `lfdist select`"
            ) from None
        return cls(fingerprint=fp, blocks=blocks, **d)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def atomic_write_text(path: str, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_plan(plan: Plan, path: str) -> None:
    atomic_write_text(
        path,
        "# lfdist plan: edit treatments by hand if you like; the fingerprint binds it to one model\n"
        + dump_yaml(plan.to_dict()),
    )


def read_yaml(path: str, what: str) -> Any:
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file; give the YAML file's path")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist; check the path")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError:
        raise UserError(f"{what} {path!r} is not text (not UTF-8); give a YAML file") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{what} {path!r} is not valid YAML{at}; fix the syntax") from None


def read_json(path: str, what: str, missing: str, invalid: str) -> Any:
    """A JSON file's contents; a missing or malformed file is one line that ends with the fix
    (`missing`, `invalid`)."""
    import json

    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist; {missing}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path!r} is not valid JSON ({e}); {invalid}") from None


def load_plan(path: str) -> Plan:
    return Plan.from_dict(read_yaml(path, "plan file"))
