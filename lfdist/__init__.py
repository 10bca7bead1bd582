"""lfdist: decide where to fine-tune a language model, then train only there.

Importing lfdist is cheap: torch, transformers, deepspeed and ray load lazily, where used.
"""

from lfdist.lazy import lazy_exports

__version__ = "0.1.0"
__all__ = ["apply_plan", "load_plan", "UserError", "__version__"]

__getattr__ = lazy_exports(
    {  # name -> module; lazy re-exports keep `import lfdist` free of torch (a test checks it)
        "apply_plan": "lfdist.model.apply",
        "load_plan": "lfdist.plan",
        "UserError": "lfdist.errors",
    }
)
