"""Speech recognition data: manifests or HF datasets, decoded with soundfile, batched for CTC.

Audio is checked when the data is set up (readable, long enough, its sample rate) and decoded
when a batch needs it: folded to mono, resampled to the encoder's rate, optionally speed
perturbed, then normalised and padded by the backbone's feature extractor.
"""

from __future__ import annotations

import io
import logging
import math
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly
from torch.utils.data import Dataset, SequentialSampler

from datamodules.base import DataModuleBase, DataSpec
from datamodules.sampling import EpochTaggedSampler, LengthGroupedBatchSampler, item_index
from datamodules.sources import VAL_SPLIT_NAMES, Split, load_hub_dataset, read_data_files, read_table
from datamodules.spoken_corpus import CorpusSpec, generate_corpus
from modules.backbones.base import resolve_local_source
from modules.errors import ConfigError, DataError
from modules.vocab import CharVocab, normalise_transcript

log = logging.getLogger(__name__)

def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased), e.g. 44.1 kHz -> 16 kHz as up 160 / down 441."""
    if orig_rate == target_rate:
        return wave
    ratio = Fraction(target_rate, orig_rate)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)


def read_audio(source: str | bytes, target_rate: int) -> np.ndarray:
    """Decode a file (or its bytes) with soundfile, fold channels to mono, resample to ``target_rate``."""
    data, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else source, dtype="float32", always_2d=True)
    return resample(data.mean(axis=1), rate, target_rate)


@dataclass
class Clip:
    """One usable example: where its audio is, its transcript and label ids."""

    audio: str | bytes
    name: str  # for messages: the file path, or dataset[row]
    text: str
    labels: list[int]
    seconds: float


class SpeechDataset(Dataset):
    """Clips decoded on access; in training, optionally speed perturbed (tempo and pitch, like Kaldi).

    A clip that passed the setup check but fails to decode here (``on_bad_input=skip``) comes out as
    None; the collator counts it into the batch (``skipped_audio``), which the task logs, so skips
    made inside worker processes are counted too.
    """

    def __init__(self, clips: list[Clip], rate: int, speed_factors: Sequence[float] = (), on_bad_input: str = "error",
                 seed: int = 0, noise_snr_db: Sequence[float] | None = None, reverb: Reverb | None = None) -> None:
        self.clips, self.rate, self.seed = clips, rate, seed
        self.reverb = reverb
        self.speed_factors = [float(f) for f in speed_factors]
        self.on_bad_input = on_bad_input
        self.noise_snr_db = tuple(noise_snr_db) if noise_snr_db else None

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        i = item_index(key, self.seed)
        clip = self.clips[i]
        try:
            wave = read_audio(clip.audio, self.rate)
        except (sf.LibsndfileError, RuntimeError, ValueError) as err:
            if self.on_bad_input == "skip":
                log.warning(f"skipped unreadable audio {clip.name}: {err}")
                return None
            raise DataError(f"cannot decode audio {clip.name}: {err}; fix or remove it, or set data.on_bad_input=skip") from None
        if self.speed_factors:
            factor = random.choice(self.speed_factors)
            if factor != 1.0:  # faster speech = fewer samples at the same rate
                wave = resample(wave, round(self.rate * factor), self.rate)
        if self.noise_snr_db:
            wave = add_noise(wave, random.uniform(*self.noise_snr_db), np.random)
        if self.reverb is not None and random.random() < self.reverb.p:
            wave = self.reverb.apply(wave, self.rate, random)
        return {"wave": wave, "labels": clip.labels, "text": clip.text, "index": i}


def add_noise(wave: np.ndarray, snr_db: float, rng: Any) -> np.ndarray:
    """``wave`` plus white Gaussian noise ``snr_db`` decibels below its power (a silent clip stays silent)."""
    power = float(np.mean(np.square(wave, dtype=np.float64)))
    if power == 0.0:
        return wave
    noise = rng.standard_normal(len(wave)) * np.sqrt(power / 10 ** (snr_db / 10))
    return (wave + noise).astype(np.float32)


@dataclass(frozen=True)
class Reverb:
    """Room reverberation by sox's ``reverb`` effect (Freeverb) on a fraction ``p`` of the training clips, with the
    reverberance (%) and room scale (%) drawn from their ranges per clip; the clip keeps its length (the tail past
    its end is cut) and its level (sox's headroom is reclaimed)."""

    p: float = 0.5
    reverberance: tuple[float, float] = (20.0, 80.0)
    room_scale: tuple[float, float] = (20.0, 100.0)

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> Reverb | None:
        if node is None:
            return None
        unknown = set(node) - {"p", "reverberance", "room_scale"}
        if unknown:
            raise ConfigError(f"data.reverb has no {sorted(unknown)}; it takes p, reverberance and room_scale, "
                              "e.g. data.reverb={p: 0.5, reverberance: [20, 80], room_scale: [20, 100]}")
        try:
            fields = {k: tuple(float(x) for x in v) if k != "p" else float(v) for k, v in node.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"data.reverb={dict(node)} must be numbers: p in (0, 1], reverberance and room_scale as "
                              "[low, high] in percent") from None
        reverb = cls(**fields)
        if not 0.0 < reverb.p <= 1.0:
            raise ConfigError(f"data.reverb.p={reverb.p} must be in (0, 1]: the fraction of training clips reverberated")
        for name in ("reverberance", "room_scale"):
            low_high = getattr(reverb, name)
            if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1] <= 100:
                raise ConfigError(f"data.reverb.{name}={list(low_high)} must be [low, high] in percent, 0 <= low <= high <= 100")
        if shutil.which("sox") is None:
            raise ConfigError("data.reverb needs sox (apt-get install -y sox)")
        return reverb

    def apply(self, wave: np.ndarray, rate: int, rng: random.Random | Any) -> np.ndarray:
        reverberance, room = rng.uniform(*self.reverberance), rng.uniform(*self.room_scale)
        raw = ["-t", "f32", "-r", str(rate), "-c", "1"]
        out = subprocess.run(["sox", *raw, "-", *raw, "-", "gain", "-h", "reverb", f"{reverberance:.1f}", "50", f"{room:.1f}",
                              "gain", "-r"], input=np.ascontiguousarray(wave, dtype=np.float32).tobytes(),
                             capture_output=True, check=False)
        if out.returncode != 0:
            raise DataError(f"sox reverb failed: {out.stderr.decode(errors='replace').strip()}")
        return np.frombuffer(out.stdout, dtype=np.float32)[: len(wave)].copy()


class AudioCollator:
    """Normalise and pad with the feature extractor; pad labels with -100."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        skipped = sum(it is None for it in items)
        items = [it for it in items if it is not None]
        if not items:
            raise DataError("every clip of a batch was unreadable and skipped; check the audio files")
        inputs = self.processor(
            [it["wave"] for it in items], sampling_rate=self.processor.sampling_rate, padding="longest",
            return_attention_mask=True, return_tensors="pt",
        )
        longest = max(len(it["labels"]) for it in items)
        labels = torch.full((len(items), max(1, longest)), -100, dtype=torch.long)
        for row, it in enumerate(items):
            labels[row, : len(it["labels"])] = torch.tensor(it["labels"], dtype=torch.long)
        return {
            "input_values": inputs["input_values"],
            "attention_mask": inputs["attention_mask"].long(),
            "labels": labels,
            "texts": [it["text"] for it in items],
            "skipped_audio": skipped,
            "indices": [it["index"] for it in items if "index" in it],  # which clips these are (skipped ones are not)
        }


class SpeechDataModule(DataModuleBase):
    """Transcribed audio for CTC from manifests (JSONL/CSV), HF datasets, or a generated spoken corpus.

    Args:
        source: a folder of manifests (with ``data_files`` naming them), one manifest file (train
            only), a hub dataset name, or a folder saved by ``datasets.save_to_disk``.
        data_files: ``{train: a.jsonl, validation: b.jsonl, test: c.jsonl}``; relative names are
            looked up in ``source``. Audio paths in a manifest are relative to the manifest's folder.
        generate: ``CorpusSpec`` fields; synthesise a spoken corpus into ``source`` first when it is
            not there yet (``datamodules.spoken_corpus``, needs espeak-ng and sox).
        audio_column / text_column / duration_column: manifest columns (duration is optional; when
            given, audio much shorter than it is treated as truncated).
        processor: the backbone's feature extractor (``train.py`` passes it): rate, normalisation, padding.
        min_duration / max_duration: clips outside this range (seconds) are dropped and counted.
        speed_perturb: speed factors to pick from per training clip (e.g. ``[0.9, 1.0, 1.1]``).
        noise_snr_db: ``[low, high]``: white noise added to each training clip at an SNR drawn from this range (dB).
        reverb: ``{p, reverberance: [low, high], room_scale: [low, high]}``: room reverberation (sox) on a fraction
            ``p`` of the training clips (``Reverb``).
        vocab_file: a saved ``vocab.json`` to use instead of building one from the training transcripts.
        group_by_length: batch clips of similar length together.
        **common: ``DataModuleBase`` arguments (fractions, caps, ``on_bad_input``: unreadable or truncated
            audio and empty transcripts stop the run, or are left out and counted; batch sizes, seed).
            Missing val/test splits are carved (and caps applied) at random, or stratified by word when
            every transcript is a single word (a keyword corpus).
    """

    modality = "audio"
    kind = "ctc"

    def __init__(
        self,
        source: str | None = None,
        data_files: Mapping[str, str] | None = None,
        generate: Mapping[str, Any] | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = "test",
        audio_column: str = "audio",
        text_column: str = "text",
        duration_column: str | None = "duration",
        processor: Any = None,
        min_duration: float = 0.0,
        max_duration: float = 20.0,
        lowercase: bool = True,
        speed_perturb: Sequence[float] | None = None,
        noise_snr_db: Sequence[float] | None = None,
        reverb: Mapping[str, Any] | None = None,
        vocab_file: str | None = None,
        group_by_length: bool = True,
        **common: Any,
    ) -> None:
        common.setdefault("test_fraction", 0.0)
        common.setdefault("batch_size", 16)
        super().__init__(**common)
        if processor is None or not hasattr(processor, "sampling_rate"):
            raise ConfigError("speech data needs an audio backbone with a feature extractor (backbone=wav2vec2_tiny, hf_audio, ...); "
                              f"this backbone gives {type(processor).__name__}")
        if not 0 <= min_duration < max_duration:
            raise ConfigError(f"data.min_duration={min_duration} must be >= 0 and below data.max_duration={max_duration}")
        if any(f <= 0 for f in speed_perturb or ()):
            raise ConfigError(f"data.speed_perturb={list(speed_perturb)} must hold factors > 0, e.g. [0.9, 1.0, 1.1]")
        self.source, self.data_files, self.generate = source, dict(data_files or {}), dict(generate or {}) or None
        self.hub_config, self.split_names = hub_config, {"train": train_split, "val": val_split, "test": test_split}
        self.audio_column, self.text_column, self.duration_column = audio_column, text_column, duration_column
        self.processor, self.rate = processor, int(processor.sampling_rate)
        self.min_duration, self.max_duration, self.lowercase = min_duration, max_duration, lowercase
        self.speed_perturb = list(speed_perturb or [])
        if noise_snr_db is not None and (len(noise_snr_db) != 2 or not noise_snr_db[0] <= noise_snr_db[1]):
            raise ConfigError(f"data.noise_snr_db={list(noise_snr_db)} must be [low, high] in dB with low <= high, e.g. [10, 30]")
        self.noise_snr_db = list(noise_snr_db) if noise_snr_db is not None else None
        self.reverb = Reverb.from_config(reverb)
        self.vocab_file, self.group_by_length = vocab_file, group_by_length
        self.collate = AudioCollator(processor)
        self.vocab: CharVocab | None = None

    # -- what the rest of the run needs to know -------------------------------------------------
    @property
    def random_train_inputs(self) -> bool:
        return len(set(self.speed_perturb)) > 1 or any(f != 1.0 for f in self.speed_perturb) or bool(self.noise_snr_db) \
            or self.reverb is not None

    def data_spec(self) -> DataSpec:
        self.setup("fit")
        assert self.vocab is not None
        return DataSpec("ctc", self.modality, vocab=tuple(self.vocab.tokens), has_test="test" in self.datasets)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "sampling_rate": self.rate}

    def save_to(self, run_dir: str | Path) -> None:
        """``vocab.json`` (to decode the model's outputs) and ``data_report.json`` (sizes, drops, resampling)."""
        super().save_to(run_dir)
        assert self.vocab is not None
        self.vocab.save(Path(run_dir) / "vocab.json")

    # -- loading --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self._load_splits()
        for role, split in splits.items():
            split.require(audio_column=self.audio_column, text_column=self.text_column)
            self.parsed_rows[role] = len(split)
        splits = self.carve(splits, self._strata)
        checked = {role: self._check(role, split) for role, split in splits.items()}
        if self.vocab_file:
            self.vocab = CharVocab.load(resolve_local_source(self.vocab_file))
        else:
            self.vocab = CharVocab.build(text for _, text, _ in checked["train"])
        for role, rows in checked.items():
            counts = self.counts.setdefault(role, Counter())
            clips = []
            for audio, text, (name, seconds) in rows:
                labels, unknown = self.vocab.encode(text)
                if unknown:
                    counts["unknown_chars"] += unknown
                clips.append(Clip(audio, name, text, labels, seconds))
            if counts["unknown_chars"]:
                log.warning(f"{role}: {counts['unknown_chars']} characters are not in the vocabulary "
                            f"(built from train); they map to <unk> and count as errors")
            speed = self.speed_perturb if role == "train" else ()
            self.datasets[role] = SpeechDataset(clips, self.rate, speed, self.on_bad_input, self.seed,
                                                self.noise_snr_db if role == "train" else None,
                                                self.reverb if role == "train" else None)
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items())
        log.info(f"speech data at {self.rate} Hz: {sizes}; vocabulary of {len(self.vocab)}: {''.join(self.vocab.tokens[3:])}")
        for role, counts in self.counts.items():
            if counts:
                log.info(f"{role}: {dict(counts)}")

    def describe(self, role: str) -> list[dict[str, Any]]:
        self.setup()
        return [{"index": i, "audio": clip.name, "reference": clip.text, "seconds": round(clip.seconds, 3)}
                for i, clip in enumerate(self.datasets[role].clips)]

    def _strata(self, split: Split) -> list[str] | None:
        """Single-word transcripts (a keyword corpus) are classes: carve and cap stratified by word.
        Sentences are no classes: carve them at random."""
        texts = [str(t).strip().lower() for t in split.columns[self.text_column]]
        return texts if texts and all(" " not in t for t in texts) else None

    def _load_splits(self) -> dict[str, Split]:
        if self.generate:
            if not self.source:
                raise ConfigError("data.generate needs data.source: the folder to synthesise the corpus into")
            generate_corpus(self.source, CorpusSpec(**self.generate))
        if self.data_files:
            base = Path(resolve_local_source(self.source)) if self.source else Path(".")
            return read_data_files(self.data_files, base, what="manifest", encoding=self.text_encoding)
        if not self.source:
            raise ConfigError("data.source is empty; give a manifest, a folder with data.data_files, or a dataset name")
        resolved = resolve_local_source(self.source)
        if Path(resolved).is_file():
            return {"train": read_table(Path(resolved), self.text_encoding)}
        return self._read_dataset(resolved)

    def _read_dataset(self, name: str) -> dict[str, Split]:
        """A hub dataset or a ``save_to_disk`` folder; an ``Audio`` column is read undecoded (path/bytes)."""
        import datasets

        loaded = load_hub_dataset(name, self.hub_config, "point data.source at a folder of manifests with data.data_files",
                                  from_disk=Path(name).is_dir())
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        out = {}
        for role, split in self.split_names.items():
            if role == "val" and split is None:
                split = next((n for n in VAL_SPLIT_NAMES if n in loaded), None)
            if not split or split not in loaded:
                continue
            ds = loaded[split]
            if isinstance(ds.features.get(self.audio_column), datasets.Audio):
                ds = ds.cast_column(self.audio_column, datasets.Audio(decode=False))  # decoding needs torchcodec
            keep = [c for c in (self.audio_column, self.text_column, self.duration_column) if c in ds.column_names]
            out[role] = Split({c: ds[c] for c in keep}, f"{name}[{split}]", list(range(len(ds))))
        if "train" not in out:
            raise ConfigError(f"dataset {name!r} has no split {self.split_names['train']!r}; its splits are: {', '.join(loaded)}")
        return out

    def _check(self, role: str, split: Split) -> list[tuple[str | bytes, str, tuple[str, float]]]:
        """Usable (audio, transcript, (name, seconds)) rows; drops and counts the rest."""
        counts = self.counts.setdefault(role, Counter())
        base = Path(split.origin).parent if Path(split.origin).is_file() else None
        durations = split.columns.get(self.duration_column) if self.duration_column else None
        rows, empty = [], []
        for i, (row, value, text) in enumerate(zip(split.row_ids, split.columns[self.audio_column],
                                                   split.columns[self.text_column], strict=True)):
            text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else normalise_transcript(text, self.lowercase)
            if not text:
                empty.append(row)
                continue
            audio, name = self._locate(value, base, f"{split.origin} row {row}")
            try:
                info = sf.info(io.BytesIO(audio) if isinstance(audio, bytes) else audio)
                seconds = info.frames / info.samplerate
                expected = durations[i] if durations is not None else None
                if expected is not None and not (isinstance(expected, float) and math.isnan(expected)) and seconds < 0.9 * float(expected) - 0.05:
                    raise ValueError(f"it holds {seconds:.2f} s but the manifest says {float(expected):.2f} s (truncated?)")
                if info.frames == 0:
                    raise ValueError("it holds no samples")
            except (sf.LibsndfileError, RuntimeError, ValueError) as err:
                if self.on_bad_input == "skip":
                    counts["bad_audio"] += 1
                    log.warning(f"skipped audio {name} ({split.origin} row {row}): {err}")
                    continue
                raise DataError(f"cannot read audio {name} ({split.origin} row {row}): {err}; "
                                "fix or remove it, or set data.on_bad_input=skip") from None
            if not self.min_duration <= seconds <= self.max_duration:
                counts["too_long" if seconds > self.max_duration else "too_short"] += 1
                continue
            if info.samplerate != self.rate:
                counts[f"resampled_from_{info.samplerate}"] += 1
            if info.channels > 1:
                counts["folded_to_mono"] += 1
            rows.append((audio, text, (name, seconds)))
        self.reject(role, "empty_transcript", empty, split.origin, f"have an empty or missing {self.text_column!r} transcript",
                    "fill in the transcripts")
        if not rows:
            raise DataError(f"no usable clips in {role} ({split.origin}): {dict(counts)}; check the audio and "
                            "data.min_duration / data.max_duration")
        dropped = {k: v for k, v in counts.items() if k in ("empty_transcript", "too_long", "too_short", "bad_audio")}
        if dropped:
            log.warning(f"{role}: dropped {sum(dropped.values())} clips: {dropped}")
        resampled = sum(v for k, v in counts.items() if k.startswith("resampled_from_"))
        if resampled:
            log.info(f"{role}: {resampled} clips will be resampled to {self.rate} Hz")
        return rows

    def _locate(self, value: Any, base: Path | None, where: str) -> tuple[str | bytes, str]:
        """A manifest path (relative to the manifest) or a datasets ``{"path", "bytes"}`` cell."""
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return value["bytes"], f"{value.get('path') or 'bytes'} ({where})"
            value = value.get("path")
        if not value:
            raise DataError(f"{where}: column {self.audio_column!r} is empty; give an audio file path")
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        return str(path), str(path)

    # -- loaders --------------------------------------------------------------------------------
    # -- loaders --------------------------------------------------------------------------------
    def collate_for(self, role: str) -> Any:
        return self.collate

    def eval_lengths(self, role: str) -> list[float] | None:
        return [c.seconds for c in self.datasets[role].clips] if self.group_by_length else None

    def batch_sampler_for(self, role: str, training: bool) -> Any:
        if not self.group_by_length:
            return None
        dataset = self.datasets[role]
        sampler = EpochTaggedSampler(len(dataset), self.seed) if training else SequentialSampler(range(len(dataset)))
        return LengthGroupedBatchSampler(sampler, [c.seconds for c in dataset.clips],
                                         self.batch_size if training else self.eval_batch_size, shuffle=training, seed=self.seed)
