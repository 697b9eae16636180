"""The tokenizer built from GGUF metadata is saved once in the cache directory and read from there later."""

from __future__ import annotations

from niyama.engine.tokenizer import Tokenizer, saved_path
from niyama.engine.weights import default_model_path

TEXTS = ["What is the capital of France?", "  spaces\n\ttabs, accents é, emoji 🎉, 中文 and <|im_start|> as text", "",
         "def f(x):\n    return x ** 2\n"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_the_saved_tokenizer_is_the_files_own(tmp_path, monkeypatch):
    monkeypatch.setenv("NIYAMA_CACHE_DIR", str(tmp_path))
    saved = saved_path(default_model_path())
    assert saved.is_relative_to(tmp_path) and not saved.exists()
    built = Tokenizer()
    assert (saved / "tokenizer.json").is_file()
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no leftover temporary folder
    loaded = Tokenizer()
    for text in TEXTS:
        ids = built.encode(text)
        assert loaded.encode(text) == ids and loaded.decode(ids) == built.decode(ids)
    for prompt in (True, False):
        assert loaded.chat(CONVERSATION, prompt) == built.chat(CONVERSATION, prompt)
    assert loaded.eos_token_ids == built.eos_token_ids and loaded.vocab_size == built.vocab_size


def test_a_tokenizer_saved_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("NIYAMA_CACHE_DIR", str(tmp_path))
    saved = saved_path(default_model_path())
    first = Tokenizer()
    (saved / "marker").write_text("first")
    first._save_atomically(saved)  # as if a second process finished building after the first had saved
    assert (saved / "marker").read_text() == "first"
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
