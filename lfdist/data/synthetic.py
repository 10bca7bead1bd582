"""Seeded synthetic data (`synthetic:lm[:N]`, `synthetic:classify[:N]`): no download, learnable.

`lm` documents are sentences from a small grammar over short word lists, so a model's loss falls
quickly when it learns the templates and the word lists. `classify` texts share one grammar and
filler words; only a few topic words tell the classes apart, so a classifier has something to
learn and nothing trivial (like length) to cheat with.
"""

from __future__ import annotations

import random

from lfdist.data.sources import TextData, make_text_data
from lfdist.errors import UserError

DEFAULT_SIZE = {"lm": 300, "classify": 400}
SEED = 0

_ADJECTIVES = ["small", "old", "bright", "quiet", "heavy", "green", "quick", "tired"]
_NOUNS = ["cat", "farmer", "robot", "teacher", "river", "engine", "garden", "sailor"]
_VERBS = ["sees", "follows", "repairs", "paints", "finds", "carries", "visits", "hears"]
_PLACES = ["the market", "the harbour", "the old mill", "the school", "the forest", "the station"]
_TIMES = ["in the morning", "at noon", "after dinner", "before the rain", "every day"]
_TEMPLATES = [
    "the {a} {n} {v} the {b} {m} {t} .",
    "every {n} in {p} {v} a {a} {m} .",
    "{t} , the {a} {n} walks to {p} and {v} the {m} .",
    "the {m} near {p} is {a} , so the {n} {v} it {t} .",
]

_TOPICS = {
    "sports": ["goal", "match", "team", "coach", "league", "striker", "referee", "season"],
    "weather": ["rain", "storm", "cloud", "forecast", "wind", "snow", "sunshine", "thunder"],
    "cooking": ["recipe", "oven", "flour", "sauce", "kitchen", "garlic", "dough", "spice"],
    "music": ["guitar", "concert", "melody", "drummer", "album", "chorus", "violin", "singer"],
}
_FILLER = (
    "people talked about the new today again many said that it was a long week in town and "
    "everyone noticed"
).split()


def synthetic_data(spec: str, task: str) -> TextData:
    """`synthetic:<kind>[:<n>]` with kind `lm` or `classify`."""
    parts = spec.split(":")
    kind = parts[1] if len(parts) > 1 else ""
    if kind not in DEFAULT_SIZE or len(parts) > 3:
        raise UserError(
            f"unknown synthetic data {spec!r}; use synthetic:lm, synthetic:classify, "
            "optionally with a size like synthetic:lm:500"
        )
    size = DEFAULT_SIZE[kind]
    if len(parts) == 3:
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise UserError(
                f"synthetic data size {parts[2]!r} in {spec!r} is not a positive "
                "integer; write it like synthetic:lm:500"
            )
        size = int(parts[2])
    rng = random.Random(f"{kind}:{SEED}")
    if kind == "lm":
        if task == "classify":
            raise UserError(
                "synthetic:lm has no labels, so it cannot be classify data; use synthetic:classify"
            )
        return make_text_data([lm_document(rng) for _ in range(size)], None, task, spec)
    names = sorted(_TOPICS)
    labels = [names[i % len(names)] for i in range(size)]  # balanced classes
    rng.shuffle(labels)
    return make_text_data([topic_text(rng, label) for label in labels], labels, task, spec)


def lm_document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        template = rng.choice(_TEMPLATES)
        sentences.append(
            template.format(
                a=rng.choice(_ADJECTIVES),
                b=rng.choice(_ADJECTIVES),
                n=rng.choice(_NOUNS),
                m=rng.choice(_NOUNS),
                v=rng.choice(_VERBS),
                p=rng.choice(_PLACES),
                t=rng.choice(_TIMES),
            )
        )
    return " ".join(sentences)


def topic_text(rng: random.Random, topic: str) -> str:
    words = [rng.choice(_FILLER) for _ in range(rng.randint(12, 24))]
    for _ in range(rng.randint(2, 4)):  # a few topic words at random positions
        words.insert(rng.randrange(len(words) + 1), rng.choice(_TOPICS[topic]))
    return " ".join(words) + " ."
