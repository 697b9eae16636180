"""Tokenizer and chat template from the model's own files (GGUF metadata or a Hugging Face directory).

Building a tokenizer from GGUF metadata takes transformers ~5 s (it parses every token and merge of the
file's metadata); the result is saved once in Hugging Face format in the cache directory, keyed by the
file and the transformers version, and later loads read that (well under a second).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from niyama.cache import cache_dir, digest
from niyama.engine.weights import resolve_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # a folder needs one


class Tokenizer:
    def __init__(self, model: str | Path | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
        from transformers import AutoTokenizer

        path = resolve_model_path(model)
        if path.is_dir():
            if not any((path / name).is_file() for name in TOKENIZER_FILES):
                raise FileNotFoundError(f"no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)})")
            self._tok = AutoTokenizer.from_pretrained(str(path))
            return
        saved = saved_path(path)
        if saved.is_dir():
            self._tok = AutoTokenizer.from_pretrained(str(saved))
            return
        self._tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self._save_atomically(saved)

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

    def _save_atomically(self, folder: Path) -> None:
        """Save into ``folder`` whole or not at all (another process may be saving the same one)."""
        tmp = None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent))
            self.save(tmp)
            tmp.rename(folder)
        except OSError:  # saved meanwhile by another process, or the cache is not writable: next time, again
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def saved_path(gguf_file: Path) -> Path:
    """Where the tokenizer of a GGUF file is saved: keyed by the file (path, size, modification time) and the
    transformers version that built it."""
    import transformers

    path = gguf_file.resolve()
    stat = path.stat()
    key = digest(str(path), str(stat.st_size), str(stat.st_mtime_ns), transformers.__version__)
    return cache_dir() / "tokenizers" / f"{gguf_file.stem}-{key}"
