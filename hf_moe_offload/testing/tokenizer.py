"""A character-level tokenizer for the tiny models: generation tests and the CLI need one, and none is downloaded.

The vocabulary is three specials (`<unk>` 0, `<pad>` 1, `<eos>` 2) and printable ASCII (ids 3..97), so every id
fits the tiny models' 128-token vocabulary and any ASCII text round-trips exactly. `tokenizers` comes with the
`bench` extra, so it is imported only when a tokenizer is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["char_tokenizer"]

_SPECIALS = ("<unk>", "<pad>", "<eos>")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer whose ids fit the tiny models' vocabulary (no download).

    Example:
        ```python
        >>> tok = char_tokenizer()
        >>> tok.decode(tok("MoE").input_ids)
        'MoE'
        ```
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *(chr(c) for c in range(32, 127))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
