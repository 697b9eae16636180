"""Tokenizer and chat template from the model's own files (GGUF metadata or a Hugging Face directory)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from niyama.engine.weights import resolve_model_path


class Tokenizer:
    def __init__(self, model: str | Path | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
        from transformers import AutoTokenizer

        path = resolve_model_path(model)
        if path.is_dir():
            self._tok = AutoTokenizer.from_pretrained(str(path))
        else:
            self._tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset() if self._tok.eos_token_id is None else frozenset({self._tok.eos_token_id})

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)

    def chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids for a conversation, rendered with the model's chat template."""
        text = self._tok.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return self._tok.encode(text, add_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer (and its chat template) in Hugging Face format."""
        self._tok.save_pretrained(str(folder))
