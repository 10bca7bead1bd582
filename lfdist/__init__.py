"""lfdist: decide where to fine-tune a language model, then train only there.

Importing lfdist is cheap: torch, transformers, deepspeed and ray load lazily, where used.
"""

__version__ = "0.1.0"

__all__ = ["apply_plan", "load_plan", "UserError", "__version__"]


def __getattr__(name: str):
    # Lazy re-exports keep `import lfdist` free of torch (a test checks it).
    if name == "apply_plan":
        from lfdist.model.apply import apply_plan

        return apply_plan
    if name == "load_plan":
        from lfdist.plan import load_plan

        return load_plan
    if name == "UserError":
        from lfdist.errors import UserError

        return UserError
    raise AttributeError(name)
