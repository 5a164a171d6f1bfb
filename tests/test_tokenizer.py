"""The offline CLIP tokenizer against openai-clip's own SimpleTokenizer."""

import importlib.util
import json
import os

import numpy as np
import pytest

from catflax import tokenizer as tok

PROMPTS = [
    "a photo of a cat",
    "A RED Circle on a textured background.",
    "Hello, World!! (really?) -- yes; no: maybe...",
    "3.14 is pi, 42 apples and 1,000,000 dollars in 2024",
    "café naïve – “curly quotes” and ‘single’ 日本語 🙂 Ünïcödé",
    "  multiple   spaces\tand\nnewlines ",
    "it's don't we'll they've I'm",
    "&amp; html &lt;tags&gt; &quot;escaped&quot;",
    "",
    "a very long prompt " * 30,  # > 77 tokens: truncated with EOS kept last
]


@pytest.fixture(scope="module")
def openai_simple_tokenizer():
    # Load simple_tokenizer.py by path: importing the `clip` package needs torchvision.
    path = os.path.join(os.path.dirname(tok.openai_bpe_path()), "simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(tok.openai_bpe_path())


def test_offline_tokenizer_matches_openai_clip(openai_simple_tokenizer):
    ids = tok.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    sot, eot = 49406, 49407
    for prompt, row in zip(PROMPTS, ids):
        expected = [sot, *openai_simple_tokenizer.encode(prompt), eot]
        if len(expected) > 77:  # openai's clip.tokenize(truncate=True) keeps EOT last
            expected = [*expected[:76], eot]
        assert list(row[: len(expected)]) == expected, prompt
        assert (row[len(expected) :] == eot).all()  # padded with <|endoftext|> like SD


def test_long_prompt_is_truncated_to_77():
    ids = tok.tokenize(PROMPTS[-1])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407


def test_vocabulary_has_clip_size():
    vocab, merges = tok.vocab_and_merges(tok.openai_bpe_path())
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizer_directory_round_trip(tmp_path):
    tok.load_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    from_dir = tok.load_tokenizer(str(tmp_path / "tokenizer"))
    np.testing.assert_array_equal(tok.tokenize(PROMPTS, from_dir), tok.tokenize(PROMPTS))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tok.load_tokenizer(str(tmp_path / "nowhere"))


def test_tokenizer_directory_without_tokenizer_files_is_refused(tmp_path):
    # A CLIP model folder without its tokenizer (transformers would build a 2-token one).
    model_dir = tmp_path / "clip"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")  # merges.txt missing
    for folder in (model_dir, tmp_path / "empty", tmp_path / "half"):
        with pytest.raises(FileNotFoundError) as err:
            tok.load_tokenizer(str(folder))
        assert str(err.value).startswith(f"{folder}: no CLIP tokenizer files")
        assert "vocab.json+merges.txt or tokenizer.json" in str(err.value)
    # Either set of files is accepted, in the folder or in a tokenizer/ inside it.
    tok.load_tokenizer().save_pretrained(str(model_dir / "tokenizer"))
    assert sorted(os.listdir(model_dir / "tokenizer")) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ids = tok.tokenize(PROMPTS[:3])
    np.testing.assert_array_equal(
        tok.tokenize(PROMPTS[:3], tok.load_tokenizer(str(model_dir))), ids
    )
    vocab, merges = tok.vocab_and_merges(tok.openai_bpe_path())
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (slow / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    np.testing.assert_array_equal(tok.tokenize(PROMPTS[:3], tok.load_tokenizer(str(slow))), ids)
