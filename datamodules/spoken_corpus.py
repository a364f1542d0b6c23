"""Synthesise a spoken corpus offline with espeak-ng + sox (and festival): digit strings (or word lists) by many voices.

    python -m datamodules.spoken_corpus --out ~/.cache/tunelab/speech/digits --n 2000
    python -m datamodules.spoken_corpus --out DIR --words yes,no,up,down --n 500 --jobs 4

Every utterance is a random sequence of words spoken by one voice (an espeak-ng accent plus a
voice variant, e.g. ``en-us+f3``) at a random speed and pitch, resampled by sox to 16 kHz mono
16-bit wav. Everything is drawn from one seeded generator before any audio is made, so the corpus
is the same whatever the number of parallel jobs. The output folder holds ``audio/``, a JSONL
manifest per split (``audio``, ``text``, ``duration``, ``voice``, ...) and ``corpus.json`` (the
settings, so an existing corpus is reused, not regenerated). Splits:

* ``train`` / ``val`` / ``test``: utterances of the training voices;
* ``val_heldout_voices`` / ``test_heldout_voices``: whole voices never heard in training (the
  two held-out voice sets are disjoint), for measuring generalisation to new speakers;
* ``test_other_synthesiser`` (``--other-n N``): the same kind of utterances spoken by a whole other synthesiser,
  festival (voices ``kal_diphone`` and ``cmu_us_slt_arctic_hts``, Debian ``festival festvox-kallpc16k
  festvox-us-slt-hts``), at random durations and sox pitch shifts: does a model hear speech, or one synthesiser?
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf

from modules.errors import ConfigError

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
FESTIVAL_VOICES = ("kal_diphone", "cmu_us_slt_arctic_hts")
SPLITS = ("train", "val", "test", "val_heldout_voices", "test_heldout_voices", "test_other_synthesiser")
INSTALL_HINT = "install them with `apt-get install -y espeak-ng sox` (Debian/Ubuntu) or `brew install espeak-ng sox`"
FESTIVAL_HINT = "install it with `apt-get install -y festival festvox-kallpc16k festvox-us-slt-hts` (Debian/Ubuntu)"


@dataclass
class CorpusSpec:
    """What to synthesise; stored as ``corpus.json`` next to the audio.

    Args:
        n: number of utterances in all.
        words: the vocabulary of words to string together (default: the ten digits).
        min_words / max_words: utterance length in words.
        accents / variants: espeak-ng voices are every ``accent+variant`` pair.
        speeds: words-per-minute range (espeak ``-s``); pitches: pitch range 0-99 (espeak ``-p``).
        heldout_voices: voices kept out of training for each held-out split (val and test).
        val_fraction / test_fraction: shares of the training voices' utterances for val / test.
        sample_rate: output rate in Hz.
        seed: everything random is drawn from this.
        other_n: utterances spoken by festival (``other_voices``) into ``test_other_synthesiser``; never in training.
        other_stretch: festival's duration stretch range (1.0: its normal speed); other_pitch: sox pitch shift range
            in cents.
    """

    n: int = 2000
    words: list[str] = field(default_factory=lambda: list(DIGITS))
    min_words: int = 1
    max_words: int = 4
    accents: list[str] = field(default_factory=lambda: list(ACCENTS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    speeds: tuple[int, int] = (130, 210)
    pitches: tuple[int, int] = (25, 75)
    heldout_voices: int = 6
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    sample_rate: int = 16000
    seed: int = 0
    other_n: int = 0
    other_voices: list[str] = field(default_factory=lambda: list(FESTIVAL_VOICES))
    other_stretch: tuple[float, float] = (0.8, 1.25)
    other_pitch: tuple[int, int] = (-300, 300)

    def __post_init__(self) -> None:
        self.other_voices, self.other_stretch, self.other_pitch = list(self.other_voices), tuple(self.other_stretch), tuple(self.other_pitch)
        if self.other_n and not self.other_voices:
            raise ConfigError("spoken corpus: other_n needs other_voices (festival voices, e.g. kal_diphone)")
        self.words, self.accents, self.variants = list(self.words), list(self.accents), list(self.variants)
        self.speeds, self.pitches = tuple(self.speeds), tuple(self.pitches)
        if not self.words:
            raise ConfigError("spoken corpus: the word list is empty; give --words or leave it for the digits")
        odd = [w for w in self.words if not isinstance(w, str) or not w.strip()]
        if odd:
            raise ConfigError(f"spoken corpus: words {odd} are not words; quote them in YAML "
                              '(yes/no/on/off read as booleans: write "yes")')
        if not 1 <= self.min_words <= self.max_words:
            raise ConfigError(f"spoken corpus: need 1 <= min_words ({self.min_words}) <= max_words ({self.max_words})")
        if len(self.voices()) <= 2 * self.heldout_voices:
            raise ConfigError(
                f"spoken corpus: {len(self.voices())} voices cannot hold out 2 x {self.heldout_voices}; "
                "add accents/variants or lower heldout_voices"
            )

    def voices(self) -> list[str]:
        return [f"{a}+{v}" for a in self.accents for v in self.variants]

    def asdict(self) -> dict[str, Any]:
        """The settings; the festival ones only when used (so a corpus made before them is still recognised)."""
        spec = asdict(self)
        if not self.other_n:
            for key in ("other_n", "other_voices", "other_stretch", "other_pitch"):
                spec.pop(key)
        return spec


@dataclass
class Utterance:
    """One utterance to speak. For festival voices (``festival:<voice>``) ``speed`` is the duration stretch in percent
    and ``pitch`` the sox pitch shift in cents; for espeak-ng they are words per minute and espeak's pitch."""

    id: str
    text: str
    voice: str
    speed: int
    pitch: int
    split: str


def require_tools(festival: bool = False) -> None:
    """One-line error naming the missing synthesis tool and how to install it."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"spoken corpus needs {' and '.join(missing)}, not found on PATH; {INSTALL_HINT}")
    if festival and shutil.which("text2wave") is None:
        raise ConfigError(f"spoken corpus: other_n needs festival's text2wave, not found on PATH; {FESTIVAL_HINT}")


def plan_corpus(spec: CorpusSpec) -> list[Utterance]:
    """Every utterance's text, voice, speed, pitch and split, drawn from one seeded generator."""
    rng = random.Random(spec.seed)
    voices = spec.voices()
    rng.shuffle(voices)
    held = spec.heldout_voices
    split_of_voice = {v: "val_heldout_voices" for v in voices[:held]}
    split_of_voice.update({v: "test_heldout_voices" for v in voices[held : 2 * held]})
    plan = []
    width = len(str(spec.n - 1))
    for i in range(spec.n):
        voice = voices[i % len(voices)]  # round robin: every voice gets a fair share
        words = [rng.choice(spec.words) for _ in range(rng.randint(spec.min_words, spec.max_words))]
        split = split_of_voice.get(voice)
        if split is None:
            r = rng.random()
            split = "val" if r < spec.val_fraction else "test" if r < spec.val_fraction + spec.test_fraction else "train"
        plan.append(Utterance(f"{i:0{width}d}", " ".join(words), voice, rng.randint(*spec.speeds), rng.randint(*spec.pitches), split))
    # drawn after the espeak-ng utterances: adding festival leaves those as they were
    for i in range(spec.other_n):
        voice = "festival:" + spec.other_voices[i % len(spec.other_voices)]
        words = [rng.choice(spec.words) for _ in range(rng.randint(spec.min_words, spec.max_words))]
        stretch = round(100 * rng.uniform(*spec.other_stretch))
        plan.append(Utterance(f"f{i:0{width}d}", " ".join(words), voice, stretch, rng.randint(*spec.other_pitch),
                              "test_other_synthesiser"))
    return plan


def speak_festival(utt: Utterance, path: Path, sample_rate: int) -> None:
    """festival's text2wave, then sox: the rate, mono 16-bit and the pitch shift."""
    voice = utt.voice.split(":", 1)[1]
    raw = path.with_suffix(".festival.wav")
    text = path.with_suffix(".txt")
    text.write_text(utt.text + "\n")
    speak = subprocess.run(["text2wave", "-eval", f"(voice_{voice})", "-eval", f"(Parameter.set 'Duration_Stretch {utt.speed / 100})",
                            str(text), "-o", str(raw)], capture_output=True, check=False)
    text.unlink()
    if speak.returncode != 0 or not raw.is_file() or raw.stat().st_size <= 44:
        raw.unlink(missing_ok=True)
        raise ConfigError(f"festival failed for voice {voice!r}: {speak.stderr.decode(errors='replace').strip()[:200]}; "
                          f"is the voice installed? {FESTIVAL_HINT}")
    convert = subprocess.run(["sox", str(raw), "-r", str(sample_rate), "-c", "1", "-b", "16", str(path), "pitch", str(utt.pitch)],
                             capture_output=True, check=False)
    raw.unlink()
    if convert.returncode != 0:
        raise ConfigError(f"sox failed converting {path}: {convert.stderr.decode(errors='replace').strip()[:200]}")


def synthesise(utt: Utterance, out_dir: Path, sample_rate: int) -> dict[str, Any]:
    """Speak one utterance into ``audio/<voice>/<id>.wav``; return its manifest row."""
    rel = Path("audio") / utt.voice.replace("+", "_").replace(":", "_") / f"{utt.id}.wav"
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if utt.voice.startswith("festival:"):
        speak_festival(utt, path, sample_rate)
        info = sf.info(str(path))
        return {"audio": str(rel), "text": utt.text, "duration": round(info.frames / info.samplerate, 4),
                "voice": utt.voice, "speed": utt.speed, "pitch": utt.pitch, "id": utt.id}
    speak = subprocess.run(
        ["espeak-ng", "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch), "--stdout", utt.text],
        capture_output=True, check=False,
    )
    if speak.returncode != 0 or not speak.stdout:
        raise ConfigError(f"espeak-ng failed for voice {utt.voice!r}: {speak.stderr.decode(errors='replace').strip()[:200]}; "
                          "list voices with `espeak-ng --voices=en` and variants with `espeak-ng --voices=variant`")
    convert = subprocess.run(
        ["sox", "-t", "wav", "-", "-r", str(sample_rate), "-c", "1", "-b", "16", str(path)],
        input=speak.stdout, capture_output=True, check=False,
    )
    if convert.returncode != 0:
        raise ConfigError(f"sox failed converting {path}: {convert.stderr.decode(errors='replace').strip()[:200]}")
    info = sf.info(str(path))
    return {"audio": str(rel), "text": utt.text, "duration": round(info.frames / info.samplerate, 4),
            "voice": utt.voice, "speed": utt.speed, "pitch": utt.pitch, "id": utt.id}


def generate_corpus(out_dir: str | Path, spec: CorpusSpec, jobs: int | None = None, progress: bool = True) -> Path:
    """Synthesise ``spec`` into ``out_dir`` (reused as is when it already holds the same corpus)."""
    out = Path(out_dir).expanduser()
    marker = out / "corpus.json"
    if marker.exists() and json.loads(marker.read_text()).get("spec") == json.loads(json.dumps(spec.asdict())):
        return out
    require_tools(festival=spec.other_n > 0)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_corpus(spec)
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(jobs) as pool:  # threads suffice: the work happens in espeak-ng/sox processes
        results = pool.map(lambda u: synthesise(u, out, spec.sample_rate), plan)
        if progress:
            from rich.progress import track

            results = track(results, total=len(plan), description=f"speaking {len(plan)} utterances", transient=True)
        rows = list(results)
    for split in SPLITS:
        with open(out / f"{split}.jsonl", "w") as f:
            for utt, row in zip(plan, rows, strict=True):
                if utt.split == split:
                    f.write(json.dumps(row) + "\n")
    counts = {s: sum(u.split == s for u in plan) for s in SPLITS}
    hours = sum(r["duration"] for r in rows) / 3600
    # written last: a folder without it is an interrupted run and gets regenerated
    marker.write_text(json.dumps({"spec": spec.asdict(), "splits": counts, "hours": round(hours, 4)}, indent=2))
    return out


def read_words(value: str) -> list[str]:
    """``--words`` is a comma-separated list or a file with one word (or phrase) per line."""
    path = Path(value).expanduser()
    if path.is_file():
        return [w.strip() for w in path.read_text().splitlines() if w.strip()]
    return [w.strip() for w in value.split(",") if w.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    defaults = CorpusSpec()
    parser = argparse.ArgumentParser(prog="python -m datamodules.spoken_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=defaults.n, help="number of utterances")
    parser.add_argument("--words", default=None, help="comma-separated words or a file of words (default: digits)")
    parser.add_argument("--min-words", type=int, default=defaults.min_words)
    parser.add_argument("--max-words", type=int, default=defaults.max_words)
    parser.add_argument("--accents", default=",".join(defaults.accents), help="espeak-ng voices (`espeak-ng --voices=en`)")
    parser.add_argument("--variants", default=",".join(defaults.variants), help="voice variants (`espeak-ng --voices=variant`)")
    parser.add_argument("--speeds", type=int, nargs=2, default=defaults.speeds, metavar=("MIN", "MAX"), help="words per minute")
    parser.add_argument("--pitches", type=int, nargs=2, default=defaults.pitches, metavar=("MIN", "MAX"), help="0-99")
    parser.add_argument("--heldout-voices", type=int, default=defaults.heldout_voices, help="voices per held-out split")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--sample-rate", type=int, default=defaults.sample_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--other-n", type=int, default=0, help="utterances by festival voices (test_other_synthesiser)")
    parser.add_argument("--other-voices", default=",".join(FESTIVAL_VOICES), help="festival voices")
    parser.add_argument("--jobs", type=int, default=None, help="parallel synthesis processes (default: CPU count, max 8)")
    args = parser.parse_args(argv)
    try:
        spec = CorpusSpec(
            n=args.n, words=read_words(args.words) if args.words else list(DIGITS), min_words=args.min_words,
            max_words=args.max_words, accents=args.accents.split(","), variants=args.variants.split(","),
            speeds=tuple(args.speeds), pitches=tuple(args.pitches), heldout_voices=args.heldout_voices,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, sample_rate=args.sample_rate, seed=args.seed,
            other_n=args.other_n, other_voices=args.other_voices.split(","),
        )
        out = generate_corpus(args.out, spec, jobs=args.jobs)
    except ConfigError as err:
        print(f"spoken_corpus: error: {err}", file=sys.stderr)
        return 2
    summary = json.loads((out / "corpus.json").read_text())
    print(f"corpus in {out}: {summary['splits']} ({summary['hours'] * 60:.1f} min of audio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
