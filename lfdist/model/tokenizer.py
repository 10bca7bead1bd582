"""A byte-level tokenizer for the tiny random-init models: no vocabulary file, no download."""

from __future__ import annotations

import json
import os


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad, bos, eos. Enough to train and probe tiny models."""

    vocab_size = 259
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8", errors="replace"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, folder: str) -> None:
        # Not an HF tokenizer: leave a note so the exported folder says how it was tokenized.
        with open(os.path.join(folder, "lfdist_tokenizer.json"), "w") as f:
            json.dump({"type": "bytes", "pad": 256, "bos": 257, "eos": 258}, f)
