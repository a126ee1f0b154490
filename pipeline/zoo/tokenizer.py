"""A CLIP tokenizer over the caption vocabulary, in the files ``CLIPTokenizer.from_pretrained(dir)`` reads.

Why this file exists: a CLIP tokenizer is byte-pair encoding with an end-of-word marker. A vocabulary of
whole words (``"red</w>"``) *without* the merges that build them is silently useless: BPE splits
``red`` into ``r e d</w>``, finds no merge, and maps every piece to the unknown token, so every caption
becomes a row of identical ids that differ only in length. A text-to-image model trained on that can
learn the number of objects from the length but never a colour or a shape. Here the merges are learned
by running BPE on the word list until every word is a single symbol, and :func:`check_tokenizer`
proves that each word maps to exactly one distinct, known id.
"""

from __future__ import annotations

import json
import pathlib
import string
from collections import Counter
from typing import Sequence

__all__ = ["BOS", "EOS", "bpe_merges", "build_tokenizer", "check_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_EOW = "</w>"


def _symbols(word: str) -> list[str]:
    return [*word[:-1], word[-1] + _EOW]


def bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol (ties broken alphabetically, so deterministic).

    Applying merges in rank order, as BPE does at encode time, reproduces the training segmentation.
    """
    seqs = [_symbols(w) for w in sorted(set(words))]
    merges = []
    while True:
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def build_tokenizer(words: Sequence[str], out_dir: str | pathlib.Path, model_max_length: int = 20):
    """Write vocab.json + merges.txt (+ the library's own files) to ``out_dir`` and return the tokenizer.

    Single letters (with and without ``</w>``) are in the vocabulary too, so an unknown word is spelled
    out letter by letter instead of collapsing to the unknown token.
    """
    from transformers import CLIPTokenizer

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = [w.lower() for w in words]
    merges = bpe_merges(words)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for sym in [*string.ascii_lowercase, *(c + _EOW for c in string.ascii_lowercase), *(a + b for a, b in merges)]:
        vocab.setdefault(sym, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, indent=0))
    # the first line is a version header, which both the fast and the slow loader skip
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    files = {"vocab": str(out_dir / "vocab.json"), "merges": str(out_dir / "merges.txt")}
    if not _takes_files():
        files = {"vocab_file": files["vocab"], "merges_file": files["merges"]}
    tok = CLIPTokenizer(**files, model_max_length=model_max_length)
    tok.save_pretrained(out_dir)
    tok = CLIPTokenizer.from_pretrained(out_dir)
    check_tokenizer(tok, words)
    return tok


def _takes_files() -> bool:
    """transformers 5 takes ``vocab=``/``merges=`` (paths or objects); 4.x took ``vocab_file=``."""
    import inspect

    from transformers import CLIPTokenizer

    return "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters


def check_tokenizer(tok, words: Sequence[str]) -> None:
    """Raise ValueError unless every word is one known id, distinct across words, and round-trips."""
    ids = {}
    for w in words:
        enc = tok(w, add_special_tokens=False).input_ids
        if len(enc) != 1 or enc[0] == tok.unk_token_id:
            raise ValueError(
                f"Tokenizer maps {w!r} to {enc} (tokens {tok.convert_ids_to_tokens(enc)}); expected one known id"
            )
        ids[w] = enc[0]
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"Tokenizer maps different words to the same id: {ids}")
    sentence = " ".join(words[: max(1, tok.model_max_length - 2)])  # stay within the model's length
    enc = tok(sentence).input_ids
    decoded = tok.decode(enc, skip_special_tokens=True)
    if enc[0] != tok.bos_token_id or enc[-1] != tok.eos_token_id or decoded != sentence:
        raise ValueError(f"Tokenizer does not round-trip {sentence!r}: {enc} -> {decoded!r}")
