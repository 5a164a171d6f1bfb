"""The CLIP tokenizer: from a model directory, or built offline from openai-clip's BPE file."""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re

import numpy as np

MAX_LENGTH = 77
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # as openai's SimpleTokenizer reads the file


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table, in CLIP's order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def openai_bpe_path() -> str:
    """Path of the BPE merges file inside the installed `openai-clip` package (not imported)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the `openai-clip` package is not installed; it ships the CLIP BPE vocabulary "
            "(pip install openai-clip==1.0.1), or pass a tokenizer directory"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), BPE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: CLIP BPE file missing from the openai-clip package")
    return path


def vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49408-token vocabulary and merge list, built exactly as openai's SimpleTokenizer."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


# What a tokenizer directory must hold, either set: without them transformers silently builds
# a tokenizer of its 2 special tokens that maps every prompt to the same ids.
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def find_tokenizer_dir(path: str) -> str | None:
    """`path` or its `tokenizer/` subfolder, whichever holds the tokenizer files; None if neither
    does."""
    for candidate in (path, os.path.join(path, "tokenizer")):
        for files in TOKENIZER_FILES:
            if all(os.path.isfile(os.path.join(candidate, f)) for f in files):
                return candidate
    return None


def tokenizer_dir(path: str) -> str:
    """`find_tokenizer_dir(path)`; else a FileNotFoundError naming the folder and the files
    expected."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: tokenizer directory not found")
    found = find_tokenizer_dir(path)
    if found is not None:
        return found
    expected = " or ".join("+".join(files) for files in TOKENIZER_FILES)
    raise FileNotFoundError(
        f"{path}: no CLIP tokenizer files in this folder (expected {expected}, here or in "
        "a tokenizer/ inside it)"
    )


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None):
    """A transformers CLIPTokenizer from `path` (a model or `tokenizer/` directory, holding
    vocab.json + merges.txt or tokenizer.json, or a folder with such a `tokenizer/` in it) or,
    when `path` is None, built offline from the BPE file of the `openai-clip` package."""
    from transformers import CLIPTokenizer

    if path is not None:
        return CLIPTokenizer.from_pretrained(tokenizer_dir(path))
    vocab, merges = vocab_and_merges(openai_bpe_path())
    return CLIPTokenizer(vocab=vocab, merges=merges)


def clean_text(text: str) -> str:
    """openai CLIP's text cleaning: ftfy fixes, HTML unescaping, whitespace collapsing."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(prompts: list[str] | str, tokenizer=None, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Token ids (B, max_length) int32: BOS, tokens, EOS, padded with the pad token, truncated
    to `max_length` with EOS kept last, as Stable Diffusion tokenises prompts."""
    tokenizer = tokenizer or load_tokenizer()
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(
        [clean_text(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
    )["input_ids"]
    return np.asarray(ids, dtype=np.int32)
