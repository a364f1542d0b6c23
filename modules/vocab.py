"""Character vocabulary for CTC: built from training transcripts, saved with the run."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modules.errors import DataError

PAD = "<pad>"  # also the CTC blank
UNK = "<unk>"
WORD_DELIMITER = "|"
SPACES = re.compile(r"\s+")


def normalise_transcript(text: str, lowercase: bool = True) -> str:
    """Collapse whitespace (and lowercase): the form vocabularies, labels and WER references use."""
    text = SPACES.sub(" ", str(text)).strip()
    return text.lower() if lowercase else text


@dataclass
class CharVocab:
    """Token list: ``<pad>`` (id 0, the CTC blank), ``<unk>``, ``|`` (between words), then characters."""

    tokens: list[str]

    def __post_init__(self) -> None:
        if self.tokens[:3] != [PAD, UNK, WORD_DELIMITER]:
            raise DataError(f"vocabulary must start with {PAD}, {UNK}, {WORD_DELIMITER}; got {self.tokens[:3]}")
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, transcripts: Iterable[str], min_count: int = 1) -> CharVocab:
        """Every character seen at least ``min_count`` times in ``transcripts`` (already normalised)."""
        counts = Counter(ch for text in transcripts for ch in text.replace(" ", ""))
        chars = sorted(ch for ch, n in counts.items() if n >= min_count and ch != WORD_DELIMITER)
        if not chars:
            raise DataError("no characters in the training transcripts; every transcript is empty")
        return cls([PAD, UNK, WORD_DELIMITER, *chars])

    @classmethod
    def load(cls, path: str | Path) -> CharVocab:
        return cls(json.loads(Path(path).read_text())["tokens"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tokens": self.tokens, "blank": PAD, "unk": UNK,
                                          "word_delimiter": WORD_DELIMITER}, indent=1, ensure_ascii=False))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def blank_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def encode(self, text: str) -> tuple[list[int], int]:
        """Label ids of a normalised transcript, and how many characters were unknown."""
        ids = [self.ids.get(WORD_DELIMITER if ch == " " else ch, self.unk_id) for ch in text]
        return ids, sum(i == self.unk_id for i in ids)

    def decode_ctc(self, ids: Sequence[int]) -> str:
        """Greedy CTC output -> text: merge repeats, drop blanks, ``|`` back to spaces."""
        out, previous = [], None
        for i in ids:
            if i != previous and i != self.blank_id:
                out.append(self.tokens[i])
            previous = i
        return SPACES.sub(" ", "".join(out).replace(WORD_DELIMITER, " ")).strip()
