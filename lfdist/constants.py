"""Names every layer agrees on, defined once (the config, the cost model, the probe, the data
readers and the CLI read them from here)."""

TASKS = ("lm", "classify")
ENGINES = ("ddp", "fsdp1", "fsdp2", "deepspeed", "single")
# Tiny architectures that are encoders: they classify, and have no causal LM to train.
ENCODERS = frozenset({"bert", "roberta", "mpnet"})
