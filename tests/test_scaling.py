"""Scale-out on the layer groups, on CPU: the blocks they give, activation checkpointing (the same gradients for text,
vision and audio), torch.compile (the same training as eager, recompiles that stop growing), and a 2-process FSDP2 run
with both turned on."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modules.classifier import Classifier
from modules.layer_groups import repeated_blocks
from modules.scaling import ScalePlan, apply_plan, compile_stats
from tests.conftest import ROOT, TINY_SCRATCH, compose_config, run_train
from tests.test_finetuning import probe

TINY_TEXT = [a for a in TINY_SCRATCH if "probe" not in a]
# backbone overrides, the blocks the layer groups must give, and a batch for each modality
MODALITIES = {
    "text": (["backbone=bert_scratch", "backbone.config_overrides.hidden_size=32", "backbone.config_overrides.num_hidden_layers=3",
              "backbone.config_overrides.num_attention_heads=2", "backbone.config_overrides.intermediate_size=64"],
             [f"backbone.model.encoder.layer.{i}" for i in range(3)]),
    # BatchNorm in every block: its running statistics must not be updated twice
    "vision_cnn": (["backbone=small_resnet_scratch"], [f"backbone.model.layer{i}" for i in range(1, 5)]),
    "vision_vit": (["backbone=timm", "backbone.model_name=vit_tiny_patch16_224", "backbone.pretrained=false", "+backbone.model_kwargs.img_size=32",
                    "+backbone.model_kwargs.depth=2"], ["backbone.model.blocks.0", "backbone.model.blocks.1"]),
    "audio": (["backbone=wav2vec2_tiny", "+backbone.config_overrides.num_hidden_layers=2"],
              ["backbone.model.encoder.layers.0", "backbone.model.encoder.layers.1"]),
}


def make_task(tmp_path: Path, modality: str) -> Classifier:
    from run.build import build

    cfg = compose_config(tmp_path, MODALITIES[modality][0])
    return Classifier(build(cfg.backbone), num_classes=3, optimizer=partial(torch.optim.AdamW, lr=1e-3))


def make_batch(modality: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if modality == "text":
        ids = torch.randint(5, 1000, (4, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0  # padding
        return {"input_ids": ids, "attention_mask": mask}
    if modality.startswith("vision"):
        return {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator)}
    return {"input_values": torch.randn(2, 8000, generator=generator), "attention_mask": torch.ones(2, 8000, dtype=torch.long)}


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_blocks_are_the_repeated_layer_groups(modality: str, tmp_path: Path) -> None:
    task = make_task(tmp_path, modality)
    assert [name for name, _ in repeated_blocks(task)] == MODALITIES[modality][1]


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_activation_checkpointing_gives_the_same_gradients(modality: str, tmp_path: Path) -> None:
    """Training mode with dropout on: the recomputation replays the same dropout masks; BatchNorm statistics move once;
    parameter names and state-dict keys do not change."""
    plain = make_task(tmp_path, modality).train()
    checkpointed = copy.deepcopy(plain)
    apply_plan(checkpointed, ScalePlan(activation_checkpointing=True))
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    batch = make_batch(modality)
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        np.random.seed(1)  # wav2vec2 draws its SpecAugment masks with numpy
        model(batch).pow(2).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads and grads.keys() == {n for n, p in checkpointed.named_parameters() if p.grad is not None}
    for name, param in checkpointed.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    buffers = dict(plain.named_buffers())
    for name, buffer in checkpointed.named_buffers():  # running mean / var / batches tracked
        assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize(("modality", "mode"), [pytest.param("vision_cnn", "regional", marks=pytest.mark.slow), ("audio", "regional"),
                                               pytest.param("vision_vit", "full", marks=pytest.mark.slow)])
def test_compile_matches_eager_on_vision_and_audio(modality: str, mode: str, tmp_path: Path) -> None:
    """compile on the other modalities (text: the training test below): the same loss and gradients as eager, no
    graph break, with fullgraph on (regional's default; the ViT classifier's whole forward compiles as one graph too)
    and static shapes. Evaluation mode: dropout and SpecAugment off, BatchNorm on its running statistics."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = make_task(tmp_path, modality).eval()
    compiled_matches_eager(eager, mode, make_batch(modality), compile_fullgraph=True, compile_dynamic=False)
    torch._dynamo.reset()


def compiled_matches_eager(eager: torch.nn.Module, mode: str, batch: dict, **options: Any) -> dict[str, torch.Tensor]:
    """A compiled copy of ``eager`` (``ScalePlan`` ``options`` besides ``compile``) gives its loss and gradients on
    ``batch`` with no new graph break; returns eager's gradients by parameter name."""
    compiled = copy.deepcopy(eager)
    apply_plan(compiled, ScalePlan(compile=mode, **options))
    breaks = compile_stats()["compile/graph_breaks"]
    losses = []
    for model in (eager, compiled):
        loss = model(batch).pow(2).sum()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    for name, param in compiled.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert compile_stats()["compile/graph_breaks"] == breaks
    return grads


@pytest.mark.slow
def test_regional_compile_of_lora_adapters_matches_eager(tmp_path: Path) -> None:
    """finetune=lora with compile=regional: each block compiles with its LoRA layers inside, no graph break, and gives
    eager's loss and adapter gradients (adapters made non-zero first, so they matter)."""
    import torch._dynamo

    from run.build import build

    torch._dynamo.reset()
    cfg = compose_config(tmp_path, [*MODALITIES["text"][0], "+backbone.lora={rank: 4, alpha: 8, dropout: 0.0}"])
    eager = Classifier(build(cfg.backbone), num_classes=3, optimizer=partial(torch.optim.AdamW, lr=1e-3)).eval()
    with torch.no_grad():
        for name, param in eager.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    grads = compiled_matches_eager(eager, "regional", make_batch("text"))
    assert any(".lora_A." in n for n in grads) and not any(".base_layer." in n for n in grads)
    torch._dynamo.reset()


@pytest.mark.slow
def test_activation_checkpointing_with_regional_compile_under_partial_freezing(tmp_path: Path) -> None:
    """Both on, dropout on, the lower blocks frozen (their output needs no gradient): inductor cannot recompute dropout
    inside a compiled checkpoint region there, so the checkpoint wraps the compiled block; the recomputation replays the
    compiled dropout masks (the same gradients as the compiled block without checkpointing)."""
    torch._dynamo.reset()
    compiled = make_task(tmp_path, "text").train()
    for name, param in compiled.named_parameters():
        if name.startswith(("backbone.model.embeddings", "backbone.model.encoder.layer.0", "backbone.model.encoder.layer.1")):
            param.requires_grad_(False)
    both = copy.deepcopy(compiled)
    apply_plan(compiled, ScalePlan(compile="regional"))
    apply_plan(both, ScalePlan(compile="regional", activation_checkpointing=True))
    batch = make_batch("text")
    for model in (compiled, both):
        torch.manual_seed(1)
        model(batch).pow(2).sum().backward()
    grads = dict(compiled.named_parameters())
    trained = [(n, p) for n, p in both.named_parameters() if p.grad is not None]
    assert {n for n, _ in trained} == {n for n, p in grads.items() if p.grad is not None} and trained
    for name, param in trained:
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    torch._dynamo.reset()


def test_activation_checkpointing_refuses_a_backbone_without_blocks(tmp_path: Path) -> None:
    from modules.errors import ConfigError

    task = make_task(tmp_path, "text")
    task.backbone.model.encoder.layer = task.backbone.model.encoder.layer[:1]  # one block: nothing repeats
    task.backbone._blocks = "encoder.layer"
    with pytest.raises(ConfigError, match=r"activation_checkpointing=true works on a backbone's repeated blocks, but "
                                          r"HFTextBackbone has none among its layer groups \(embeddings, block_0, head\)"):
        apply_plan(task, ScalePlan(activation_checkpointing=True))


def test_regional_compile_trains_like_eager_and_stops_recompiling(tmp_path: Path, cache_dir: Path) -> None:
    """compile=regional with gradual unfreezing (the trainable set changes twice) and dynamic padding: the same weights
    as eager within float tolerance; recompilations come from those changes, not from every step."""
    # no dropout: compiled code draws its random numbers its own way
    common = [*TINY_SCRATCH, "finetune=gradual", "finetune.unit=step", "finetune.every=3", "trainer.max_steps=12",
              "trainer.max_epochs=100", "test_after_fit=false", "trainer.limit_val_batches=1", "task.dropout=0",
              "+backbone.config_overrides.hidden_dropout_prob=0", "+backbone.config_overrides.attention_probs_dropout_prob=0"]
    eager = run_train(tmp_path / "eager", common, cache_dir)
    compiled = run_train(tmp_path / "regional", [*common, "compile=regional"], cache_dir)
    assert "compile/recompiles" not in eager
    a, b = probe(tmp_path / "eager"), probe(tmp_path / "regional")
    assert [s["trainable"] for s in a["steps"]] == [s["trainable"] for s in b["steps"]]
    for group, weights in a["end"].items():
        torch.testing.assert_close(b["end"][group], weights, rtol=1e-4, atol=1e-5, msg=group)
    history = json.loads((tmp_path / "regional" / "reports" / "compile.json").read_text())
    assert len(history) == 12 and compiled["compile/frames"] >= 1 and compiled["compile/graph_breaks"] == 0
    recompiles = [h["compile/recompiles"] for h in history]
    # block 2 joins at step 3, block 1 at 6, block 0 at 9: each is a new variant of the one compiled block code
    assert recompiles[-1] == compiled["compile/recompiles"] <= 8
    assert recompiles[-1] == recompiles[-3], recompiles  # the last steps compiled nothing new


def test_a_masked_lm_training_step_never_waits_for_the_device(tmp_path: Path, cache_dir: Path) -> None:
    """A step without waste: over profiled optimizer steps of a masked-LM run, nothing in the step reads a tensor back
    to the host, indexes with a boolean mask or copies a host number to the device (each a sync on a GPU): the masked
    positions and the all-ones attention mask are settled on the host before the transfer, the non-finite verdict
    stays on the device (the fused optimizer skips by ``found_inf``), nothing is put on an absent progress bar. The
    only reads left are the CPU fused optimizer's own host check of ``found_inf`` (on a GPU it reads it there)."""
    from tests.test_resume import TINY_MLM

    run_train(tmp_path, [*TINY_MLM, "trainer.max_steps=12", "trainer.enable_progress_bar=false", "test_after_fit=false",
                         "optimizer.fused=true", "+callbacks.step_profile._target_=callbacks.StepProfile"], cache_dir)
    profile = json.loads((tmp_path / "reports" / "step_profile.json").read_text())
    assert profile["steps"] == 5 and profile["aten_ops_per_step"] > 100
    assert profile["syncs_per_step_outside_the_fused_optimizer"] == {}, profile["first_seen_under"]


def test_compile_options_reach_torch_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile_options`` as torch.compile receives them: regional blocks compile whole by default (a graph break is an
    error), the task's whole forward allows breaks unless asked; mode and static shapes pass through; torch's own
    defaults are not spelled out (an older torch sees nothing new). The spy compiles nothing."""
    seen: list[dict[str, Any]] = []

    def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    blocks = len(MODALITIES["text"][1])
    for plan, expected, count in [
        (ScalePlan(compile="regional"), {"dynamic": None, "fullgraph": True}, blocks),
        (ScalePlan(compile="full"), {"dynamic": None}, 1),
        (ScalePlan(compile="full", compile_fullgraph=True, compile_dynamic=False, compile_mode="max-autotune-no-cudagraphs"),
         {"dynamic": False, "fullgraph": True, "mode": "max-autotune-no-cudagraphs"}, 1),
        (ScalePlan(compile="regional", compile_fullgraph=False, compile_mode="reduce-overhead", activation_checkpointing=True),
         {"dynamic": None, "mode": "reduce-overhead"}, blocks),
    ]:
        seen.clear()
        apply_plan(make_task(tmp_path, "text"), plan)
        assert seen == [expected] * count, plan
    from modules.errors import ConfigError

    with pytest.raises(ConfigError, match=r"compile_options.mode='fast' is unknown; choose one of default, reduce-overhead"):
        ScalePlan(compile="regional", compile_mode="fast")
    with pytest.raises(ConfigError, match=r"compile_options.dynamic='no' must be true, false or null \(auto\)"):
        ScalePlan(compile="regional", compile_dynamic="no")


def test_static_shapes_on_unbounded_text_padding_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """compile_options.dynamic=false with text padded to each batch's longest: a warning names the fix; padded to a
    multiple, none."""
    import logging

    from run.checks import check_config

    static = [*TINY_SCRATCH, "compile=regional", "compile_options.dynamic=false"]
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        check_config(compose_config(tmp_path, static))
        assert "compiles each padded length anew" in caplog.text and "data.pad_to_multiple_of=64" in caplog.text
        caplog.clear()
        check_config(compose_config(tmp_path, [*static, "data.pad_to_multiple_of=16"]))
        assert "padded length" not in caplog.text


def block_with_a_graph_break(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph break in every BERT block (``torch._dynamo.graph_break``: eagerly nothing)."""
    from transformers.models.bert import modeling_bert

    forward = modeling_bert.BertLayer.forward

    def breaking(self: Any, *args: Any, **kwargs: Any) -> Any:
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertLayer, "forward", breaking)


def test_a_graph_break_under_fullgraph_is_one_line(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=regional compiles each block whole (fullgraph on by default): a block that breaks the graph stops the run
    with one line naming the break and the way out, not dynamo's page of trace (the counted fallback is tested by the
    compile report's test below)."""
    from modules.errors import TrainingError

    torch._dynamo.reset()
    block_with_a_graph_break(monkeypatch)
    with pytest.raises(TrainingError, match=r"compile=regional with compile_options.fullgraph=true, but torch.compile met "
                                            r"a graph break: .*; set compile_options.fullgraph=false to compile around it"):
        run_train(tmp_path, [*TINY_SCRATCH, "trainer.max_steps=2", "test_after_fit=false", "compile=regional"], cache_dir)
    torch._dynamo.reset()


def test_recompiles_are_counted_on_a_torch_without_the_total_cache_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch 2.6-2.11 have no ``_get_total_cache_entry_count``: the count per code object then comes from the list of
    its cache entries, and agrees (three batch sizes: a static compile, then one dynamic recompile)."""
    import torch._dynamo.eval_frame as eval_frame

    from modules.scaling import dynamo_cache_sizes

    class Block(torch.nn.Module):  # defined here: dynamo skips frames that are all torch's own (a bare nn.Linear)
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).relu()

    torch._dynamo.reset()
    layer = Block()
    layer.compile()
    for rows in (2, 3, 5):
        layer(torch.randn(rows, 4))
    with_total = dynamo_cache_sizes()
    if hasattr(eval_frame, "_get_total_cache_entry_count"):
        monkeypatch.delattr(eval_frame, "_get_total_cache_entry_count")
    assert dynamo_cache_sizes() == with_total and max(with_total) == 2
    torch._dynamo.reset()


def test_compile_report_without_dynamos_private_counters_says_unavailable(tmp_path: Path, cache_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11 has no ``_get_total_cache_entry_count`` (compile=regional crashed on it): with the private names
    gone the run still compiles and trains; the report says "unavailable" and the metrics leave the count out. The
    blocks break their graphs here, with fullgraph off: compiled around, and counted."""
    import modules.scaling

    def torch_2_11() -> list[int]:  # what the private import does there (dynamo itself still needs the name here)
        raise ImportError("cannot import name '_get_total_cache_entry_count' from 'torch._dynamo.convert_frame'")

    torch._dynamo.reset()
    monkeypatch.setattr(modules.scaling, "dynamo_cache_sizes", torch_2_11)
    block_with_a_graph_break(monkeypatch)
    metrics = run_train(tmp_path, [*TINY_SCRATCH, "trainer.max_steps=3", "test_after_fit=false", "compile=regional",
                                   "compile_options.fullgraph=false"], cache_dir)
    assert "compile/recompiles" not in metrics and metrics["compile/frames"] >= 1 and metrics["compile/graph_breaks"] >= 1
    history = json.loads((tmp_path / "reports" / "compile.json").read_text())
    assert len(history) == 3 and {h["compile/recompiles"] for h in history} == {"unavailable"}
    monkeypatch.undo()
    torch._dynamo.reset()


@pytest.mark.slow
def test_fsdp2_with_regional_compile_and_activation_checkpointing(tmp_path: Path, cache_dir: Path) -> None:
    """The three together on 2 CPU processes, with an explicit milestone plan (block 2 from step 2, everything from
    step 4): the trainable set follows the plan on both ranks, every group trains once it joins, ranks agree."""
    run_dir = tmp_path / "run"
    args = [*TINY_SCRATCH, "trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2", "compile=regional",
            "activation_checkpointing=true", "data.pad_to_multiple_of=16", "trainer.max_steps=6", "trainer.max_epochs=100",
            "test_after_fit=false",
            "finetune=milestones", "finetune.unit=step", "finetune.milestones=[{at: 2, groups: [block_2]}, {at: 4, groups: [all]}]",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = probe(run_dir, 0), probe(run_dir, 1)
    everything = ["embeddings", "block_0", "block_1", "block_2", "head"]
    plan = [["head"], ["head"], ["block_2", "head"], ["block_2", "head"], everything, everything]
    assert [s["trainable"] for s in rank0["steps"]] == [s["trainable"] for s in rank1["steps"]] == plan
    for group in rank0["end"]:
        assert torch.equal(rank0["end"][group], rank1["end"][group]), group
        assert not torch.equal(rank0["start"][group], rank0["end"][group]), group
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["compile/graph_breaks"] == 0 and metrics["compile/frames"] >= 1


def test_bf16_mixed_on_cpu_learns(tmp_path: Path, cache_dir: Path) -> None:
    """trainer.precision=bf16-mixed on CPU (autocast): a few memorised batches, the training loss falls, finite."""
    import csv

    run_train(tmp_path, [*TINY_TEXT, "trainer.precision=bf16-mixed", "debug=overfit",
                         "optimizer.lr=1e-3", "test_after_fit=false", "trainer.log_every_n_steps=1"], cache_dir)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
def test_fsdp1_on_gpus_with_gradual_unfreezing(tmp_path: Path, cache_dir: Path) -> None:
    """trainer=fsdp (FSDP1, one unit per block, use_orig_params) with gradual unfreezing; frozen groups stay put."""
    devices = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "run"
    args = [*TINY_SCRATCH, "trainer=fsdp", f"trainer.devices={devices}", "finetune=gradual", "finetune.unit=step",
            "finetune.every=2", "trainer.max_steps=6", "trainer.max_epochs=100", "test_after_fit=false",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    for rank in range(devices):  # each rank's part of every group (FSDP1 keeps a shard of the flat parameters)
        state = probe(run_dir, rank)
        plan = [s["trainable"] for s in state["steps"]]
        assert plan == [["head"]] * 2 + [["block_2", "head"]] * 2 + [["block_1", "block_2", "head"]] * 2, plan
        for group in ("embeddings", "block_0"):  # never unfrozen: bit-identical
            assert torch.equal(state["start"][group], state["end"][group]), f"{group} moved while frozen"
        for group in ("block_1", "block_2", "head"):
            assert not torch.equal(state["start"][group], state["end"][group]), f"{group} did not train"


@pytest.mark.parametrize("trainer", ["fsdp", "fsdp2"])
def test_a_kill_while_shards_are_written_leaves_the_previous_sharded_checkpoint_whole(trainer: str, tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sharded strategies, as the trainer configs build them: the shards of a save go to a staging folder that is
    renamed over the checkpoint once every process has written; a save killed halfway leaves the old folder whole."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from run.config import compose_config as trainer_config

    def lightning_save(self: object, checkpoint: dict, filepath: object, storage_options: object = None) -> None:
        folder = Path(str(filepath))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__0_0.distcp").write_text(checkpoint["step"])
        if checkpoint.get("killed"):
            raise KeyboardInterrupt  # the process dies with half its shards written
        (folder / "__1_0.distcp").write_text(checkpoint["step"])
        (folder / "meta.pt").write_text(checkpoint["step"])

    parent = FSDPStrategy if trainer == "fsdp" else ModelParallelStrategy
    monkeypatch.setattr(parent, "save_checkpoint", lightning_save)
    strategy = instantiate(trainer_config([f"trainer={trainer}"]).trainer.strategy)
    target = tmp_path / "checkpoints" / "last.ckpt"
    strategy.save_checkpoint({"step": "4"}, target)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"step": "8", "killed": True}, target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"__0_0.distcp": "4", "__1_0.distcp": "4", "meta.pt": "4"}
    strategy.save_checkpoint({"step": "12"}, target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"__0_0.distcp": "12", "__1_0.distcp": "12", "meta.pt": "12"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the killed save's staging is gone
