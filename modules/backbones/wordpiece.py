"""Train a BERT-style WordPiece tokenizer on a corpus with `tokenizers`, cached by corpus and size."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from modules.errors import ConfigError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece(texts: Sequence[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer trained on ``texts``, wrapped as a ``BertTokenizerFast`` ([PAD] is id 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is too small; use at least 1000 (BERT uses 30522)")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # the trainer breaks frequency ties in hash order, so token ids differ from run to run (measured: 42 of 2,000
    # on BBC News); WordPiece only needs the set, so give the ids in a fixed order: specials first, then sorted
    trained = tok.get_vocab()
    ordered = SPECIAL_TOKENS + sorted(t for t in trained if t not in SPECIAL_TOKENS)
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok, do_lower_case=lowercase, unk_token="[UNK]", sep_token="[SEP]",
        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=512,
    )


def train_wordpiece(
    texts: Sequence[str],
    vocab_size: int = 8000,
    lowercase: bool = True,
    cache_dir: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train (or load from ``cache_dir``, keyed by the texts and settings) a WordPiece tokenizer on ``texts``.

    The configs hand the texts over already read (``texts: {_target_: datamodules.corpus.read_corpus, ...}``), as the
    data reads them: the model side never reads data files itself."""
    if isinstance(texts, str) or not texts:
        raise ConfigError("backbone.train_tokenizer.texts must be a non-empty list of texts (e.g. "
                          "{_target_: datamodules.corpus.read_corpus, source: ...})")
    key = hashlib.sha1(f"{vocab_size}|{lowercase}|{len(texts)}".encode())
    for t in texts:
        key.update(t.encode("utf-8", "replace"))
    folder = Path(cache_dir).expanduser() / "tokenizers" / f"wordpiece-{vocab_size}-{key.hexdigest()[:16]}" if cache_dir else None
    if folder is not None and (folder / "tokenizer.json").exists():
        return BertTokenizerFast.from_pretrained(folder)
    tokenizer = build_wordpiece(list(texts), vocab_size, lowercase)
    log.info(f"trained a WordPiece tokenizer on {len(texts)} texts: {len(tokenizer)} tokens")
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer
