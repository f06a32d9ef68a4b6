"""SentencePiece vocabularies from GGUF metadata (``tokenizer.ggml.model == "llama"``: Llama-2, Mistral-era files)
as a ``tokenizers`` BPE model, so they tokenize as llama.cpp's SPM tokenizer does.

llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose merged piece has the highest score. A BPE model
whose merges are every (left, right) split of every vocabulary piece, ranked by that piece's score, makes the same
choices. Text is normalised the SentencePiece way (spaces become "▁", one "▁" in front), and characters outside the
vocabulary fall back to their UTF-8 byte tokens (``<0xNN>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

from longserve.loading.errors import ModelLoadError

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"


def sentencepiece_bpe(
    tokens: Sequence[str],
    scores: Sequence[float],
    token_types: Sequence[int],
    unk_id: int | None,
    add_space_prefix: bool = True,
) -> tokenizers.Tokenizer:
    """The tokenizer for a GGUF SentencePiece vocabulary (tokens, their scores and llama.cpp token types)."""
    if not tokens:
        raise ModelLoadError("GGUF has no tokenizer.ggml.tokens")
    types = list(token_types) or [_NORMAL] * len(tokens)
    scores = list(scores) or [0.0] * len(tokens)
    if not len(types) == len(scores) == len(tokens):
        raise ModelLoadError(
            f"GGUF has {len(tokens)} tokens, {len(scores)} scores and {len(types)} token types"
        )
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    mergeable = {
        token: index
        for index, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (_NORMAL, _USER_DEFINED) and vocab[token] == index
    }
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, index in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                # Higher score merges first; equal scores by the ids involved, for a fixed order.
                ranked.append((-scores[index], mergeable[left], mergeable[right], left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    try:
        bpe = models.BPE(
            vocab=vocab,
            merges=[(r[3], r[4]) for r in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as e:
        raise ModelLoadError(f"GGUF SentencePiece vocabulary does not form a valid BPE model: {e}") from e
    backend = tokenizers.Tokenizer(bpe)
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind in (_CONTROL, _UNKNOWN)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED]
    backend.add_tokens([AddedToken(t, normalized=False) for t in user])
    return backend
