"""An offline character tokenizer for models with random weights (`from_config`), so that strings work
everywhere, also without a model hub: one token per printable ASCII character (and newline), the config's
pad/bos/eos ids as special tokens, `<bos>` prepended. It is not any checkpoint's tokenizer; a real checkpoint
loaded with `from_pretrained` brings its own.
"""

from __future__ import annotations

from lens_det.config import LensConfig

CHARACTERS = [chr(i) for i in range(32, 127)] + ["\n"]


def char_tokenizer(cfg: LensConfig):
    """A transformers PreTrainedTokenizerFast over `cfg`'s vocabulary (characters that do not fit are <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    specials = {"<pad>": cfg.pad_token_id, "<bos>": cfg.bos_token_id, "<eos>": eos}
    vocab = {name: i for name, i in specials.items() if i is not None}
    free = (i for i in range(cfg.d_vocab) if i not in vocab.values())
    vocab["<unk>"] = next(free)
    for char, i in zip(CHARACTERS, free):
        vocab[char] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    tok.decoder = decoders.Fuse()
    if "<bos>" in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   **{k: name for k, name in (("pad_token", "<pad>"), ("bos_token", "<bos>"),
                                                              ("eos_token", "<eos>")) if name in vocab})
