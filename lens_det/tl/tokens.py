"""Tokens in TransformerLens's terms: TokensAndMask (what to_tokens returns), the error texts for its misuse and
for a model without a tokenizer, and the TLTokens mixin (to_tokens, to_string, to_str_tokens, get_token_position,
to_single_token, set_tokenizer) that HookedDecoder inherits."""

from __future__ import annotations

from typing import Literal

import torch

TO_TOKENS_IDIOM = ("model.to_tokens returns (tokens, attention_mask), not a tensor (a lost mask would silently "
                   "attend to pads): write `tokens, mask = model.to_tokens(text)` and pass attention_mask=mask, or "
                   "pass the pair or the text itself: model(model.to_tokens(text)), model(text), "
                   "model.run_with_cache(text), model.generate(text)")


class TokensAndMask(tuple):
    """(tokens, attention_mask) from to_tokens; unpacks as a pair. Passed whole to forward, run_with_cache,
    run_with_hooks or generate it runs with its mask (and, like text, positions from the mask), so TransformerLens's
    `model(model.to_tokens(text))` is right. TransformerLens code that treats it as the token tensor
    (`tokens.shape`, `tokens[:, 1:]`) gets an error that says what to write instead."""

    def __getattr__(self, name):
        raise AttributeError(f"{name!r}: {TO_TOKENS_IDIOM}")

    def __getitem__(self, index):  # pair[0], pair[1] as a tuple; tensor indexing says what to write
        if isinstance(index, tuple):
            raise TypeError(f"indexing the pair as a tensor: {TO_TOKENS_IDIOM}")
        return super().__getitem__(index)


NO_TOKENIZER = ("this model has no tokenizer, so it takes token ids only: set one with `model.tokenizer = "
                "transformers.AutoTokenizer.from_pretrained(name_or_dir)` or load with from_pretrained(name_or_dir), "
                "which attaches the checkpoint's tokenizer (from_config models carry an offline character tokenizer)")


class TLTokens:
    """HookedDecoder's tokenizer methods, as TransformerLens's; they read `self.tokenizer` (None: token ids only)
    and `self.cfg.device`."""

    def to_tokens(self, text: str | list[str], padding_side: Literal["left", "right"] | None = "left",
                  prepend_bos: bool | None = True):
        """Tokenize with the model's tokenizer: returns (tokens [batch, pos], attention_mask [batch, pos]), a
        TokensAndMask pair. None means the default (left padding, BOS prepended), as TransformerLens passes it."""
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        prepend_bos = True if prepend_bos is None else prepend_bos  # TL tools pass None for "the default"
        padding_side = "left" if padding_side is None else padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no prompts (an empty list): to_tokens needs at least one string")
        tok, side, pad = self.tokenizer, self.tokenizer.padding_side, self.tokenizer.pad_token
        try:  # leave the tokenizer as it was
            tok.padding_side = padding_side
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=prepend_bos)
        finally:
            tok.padding_side, tok.pad_token = side, pad
        return TokensAndMask((enc["input_ids"].to(self.cfg.device), enc["attention_mask"].to(self.cfg.device)))

    def to_string(self, tokens, skip_special_tokens: bool = False) -> str | list[str]:
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return self.tokenizer.batch_decode(tokens, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def set_tokenizer(self, tokenizer) -> None:
        """Attach a tokenizer (e.g. transformers.AutoTokenizer.from_pretrained(name)), as TransformerLens."""
        self.tokenizer = tokenizer

    def to_str_tokens(self, input, prepend_bos: bool = True) -> list[str] | list[list[str]]:
        """Each token as its string, as TransformerLens: a string or 1-D ids -> list[str]; a list of strings or
        2-D ids -> one list per row (a 2-D batch of one row -> list[str])."""
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text, prepend_bos) for text in input]
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)[0][0]
        ids = torch.as_tensor(input)
        if ids.ndim == 2:
            return self.to_str_tokens(ids[0]) if ids.shape[0] == 1 else [self.to_str_tokens(row) for row in ids]
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        return [self.tokenizer.decode([int(t)]) for t in ids]

    def get_token_position(self, single_token: str | int, input, mode: Literal["first", "last"] = "first",
                           prepend_bos: bool = True) -> int:
        """Index of `single_token` in `input` (a string, or ids of one sequence), as TransformerLens."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0][0] if isinstance(input, str) else torch.as_tensor(input)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of {ids.shape[0]}")
            ids = ids[0]
        where = (ids == token).nonzero().flatten()
        if where.numel() == 0:
            raise ValueError(f"token {single_token!r} ({token}) is not in the input")
        return int(where[0 if mode == "first" else -1])

    def to_single_token(self, text: str) -> int:
        tokens, _ = self.to_tokens(text, prepend_bos=False)
        if tokens.shape[1] != 1:
            raise ValueError(f"{text!r} is {tokens.shape[1]} tokens, not one")
        return int(tokens[0, 0])
