"""Freezing schedules, layer-wise LR, unfreeze LRs and bad input, through real (tiny) training runs."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from callbacks import STRATEGIES, FinetuneSchedule
from modules.errors import ConfigError
from modules.optim import param_groups
from tests.conftest import TINY_SCRATCH, compose_config, run_train

GROUPS = ["embeddings", "block_0", "block_1", "block_2", "head"]


def probe(run_dir: Path, rank: int = 0) -> dict:
    return torch.load(run_dir / f"probe_rank{rank}.pt", weights_only=False)


def changed(state: dict, group: str) -> bool:
    return not torch.equal(state["start"][group], state["end"][group])


def tiny_run(tmp_path: Path, cache_dir: Path, *overrides: str) -> dict:
    run_train(tmp_path, [*TINY_SCRATCH, "test_after_fit=false", "trainer.max_epochs=100", *overrides], cache_dir)
    return probe(tmp_path)


def test_linear_probe_keeps_the_backbone_bit_identical(tmp_path: Path, cache_dir: Path) -> None:
    state = tiny_run(tmp_path, cache_dir, "finetune=linear_probe", "trainer.max_steps=4")
    assert all(s["trainable"] == ["head"] for s in state["steps"])
    assert changed(state, "head")
    for group in GROUPS[:-1]:
        assert not changed(state, group), f"{group} moved while frozen"


def test_partial_trains_only_the_top_groups(tmp_path: Path, cache_dir: Path) -> None:
    state = tiny_run(tmp_path, cache_dir, "finetune=partial", "finetune.top_k=1", "trainer.max_steps=3")
    assert state["steps"][0]["trainable"] == ["block_2", "head"]
    assert [changed(state, g) for g in GROUPS] == [False, False, False, True, True]


def test_gradual_by_step_unfreezes_top_down_at_exact_steps(tmp_path: Path, cache_dir: Path) -> None:
    state = tiny_run(tmp_path, cache_dir, "finetune=gradual", "finetune.unit=step", "finetune.every=2", "trainer.max_steps=9")
    got = {s["step"]: s["trainable"] for s in state["steps"]}
    assert got[0] == got[1] == ["head"]
    assert got[2] == got[3] == ["block_2", "head"]
    assert got[4] == ["block_1", "block_2", "head"]
    assert got[6] == ["block_0", "block_1", "block_2", "head"]
    assert got[8] == GROUPS
    assert all(changed(state, g) for g in GROUPS)  # every group unfrozen mid-run really trained


def test_freeze_then_unfreeze_by_epoch(tmp_path: Path, cache_dir: Path) -> None:
    state = tiny_run(tmp_path, cache_dir, "finetune=freeze_then_unfreeze", "finetune.at=1", "trainer.max_epochs=2")
    by_epoch = {s["epoch"]: s["trainable"] for s in state["steps"]}
    assert by_epoch[0] == ["head"] and by_epoch[1] == GROUPS
    first_epoch1 = next(s for s in state["steps"] if s["epoch"] == 1)
    assert first_epoch1["step"] == len([s for s in state["steps"] if s["epoch"] == 0])


def test_milestones_with_names_and_all(tmp_path: Path, cache_dir: Path) -> None:
    state = tiny_run(tmp_path, cache_dir, "finetune=milestones", "finetune.unit=step",
                     "finetune.milestones=[{at: 1, groups: [block_2]}, {at: 3, groups: [all]}]", "trainer.max_steps=4")
    got = {s["step"]: s["trainable"] for s in state["steps"]}
    assert got[0] == ["head"] and got[1] == got[2] == ["block_2", "head"] and got[3] == GROUPS


def test_layerwise_decay_and_schedule_formula_at_every_step(tmp_path: Path, cache_dir: Path) -> None:
    """lr_g(step) = lr * decay**(distance from top) * schedule(step), checked for every group and step."""
    total = 12
    state = tiny_run(tmp_path, cache_dir, "task.lr_decay=0.5", "task.head_lr_scale=4", "optimizer.lr=1e-3",
                     "scheduler=cosine", "scheduler.warmup=3", "scheduler.final_scale=0.1", f"trainer.max_steps={total}")
    scale = {"embeddings": 0.125, "block_0": 0.25, "block_1": 0.5, "block_2": 1.0, "head": 4.0}
    for s in state["steps"]:
        t = s["step"]
        factor = (t + 1) / 3 if t < 3 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 3) / (total - 3)))
        for group, lr in s["lr"].items():
            assert lr == pytest.approx(1e-3 * scale[group] * factor, rel=1e-9), (t, group)


def test_lr_range_test_sweeps_every_group_then_the_run_trains_as_if_given_its_suggestion(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tune=lr: the swept LR multiplies every group's scale (layer-wise decay, the head's 4x) at every step, the freezing
    schedule runs inside the range test as in training, and afterwards the run trains bit for bit as a run given
    optimizer.lr=<the suggestion> (weights, buffers, random streams and epoch metrics put back)."""
    import json

    from omegaconf import OmegaConf

    from run import lr_find

    seen: list[tuple[int, dict[str, float], list[str]]] = []
    sweep = lr_find.LRRangeTest.on_train_batch_start

    def spy(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        sweep(self, trainer, pl_module, batch, batch_idx)
        groups = trainer.optimizers[0].param_groups
        seen.append((trainer.global_step, {g["layer_group"]: g["lr"] for g in groups},
                     sorted({g["layer_group"] for g in groups if g["params"][0].requires_grad})))

    monkeypatch.setattr(lr_find.LRRangeTest, "on_train_batch_start", spy)
    common = ["task.lr_decay=0.5", "task.head_lr_scale=4", "scheduler=linear", "finetune=gradual", "finetune.unit=step",
              "finetune.every=10", "trainer.max_steps=12"]
    tuned = tiny_run(tmp_path / "tuned", cache_dir, *common, "tune=lr", "tune.lr_find.steps=30", "tune.lr_find.max_lr=10")
    test = lr_find.RangeTest(steps=30, max_lr=10.0)
    scale = {"embeddings": 0.125, "block_0": 0.25, "block_1": 0.5, "block_2": 1.0, "head": 4.0}
    assert [step for step, _, _ in seen] == list(range(len(seen))) and len(seen) >= 10
    for step, lrs, trainable in seen:
        assert lrs == pytest.approx({g: test.lr_at(step) * k for g, k in scale.items()}, rel=1e-12), step
        assert trainable == (["head"] if step < 10 else ["block_2", "head"] if step < 20 else ["block_1", "block_2", "head"])
    found = json.loads((tmp_path / "tuned" / "lr_find.json").read_text())
    assert [c["lr"] for c in found["curve"]] == pytest.approx([test.lr_at(i) for i in range(len(found["curve"]))])
    applied = OmegaConf.load(tmp_path / "tuned" / "config.yaml").optimizer.lr
    assert found["suggested_lr"] == applied == found["applied_lr"] and test.min_lr < applied < test.max_lr
    assert found["suggestions"]["steepest"] == applied and set(found["suggestions"]) == {"steepest", "valley", "minimum"}
    assert (tmp_path / "tuned" / "lr_find.png").stat().st_size > 1000
    given = tiny_run(tmp_path / "given", cache_dir, *common, f"optimizer.lr={applied!r}")
    assert [s["lr"] for s in tuned["steps"]] == [s["lr"] for s in given["steps"]]
    for group in GROUPS:
        assert torch.equal(tuned["start"][group], given["start"][group]), group
        assert torch.equal(tuned["end"][group], given["end"][group]), group
    metrics = [{k: v for k, v in json.loads((tmp_path / run / "metrics.json").read_text()).items() if not k.startswith("time/")}
               for run in ("tuned", "given")]
    assert metrics[0] == metrics[1] and "val/acc" in metrics[0]


def test_lr_range_test_rules_read_the_curve_and_bad_settings_are_refused() -> None:
    from run.lr_find import RangeResult, RangeTest, suggest, tenth_of_lowest, valley, warm_up

    lrs = [1e-6 * 10 ** (i / 10) for i in range(61)]  # 1e-6 .. 1
    falling = [2 - math.tanh(2 * (math.log10(lr) + 3)) for lr in lrs]  # falls fastest at 1e-3
    rising = falling[:50] + [falling[49] + 0.5 * (i - 49) for i in range(50, 61)]
    assert suggest(lrs, rising) == pytest.approx(1e-3, rel=0.3)
    assert suggest(lrs, [1.0 + 0.01 * i for i in range(61)]) is None  # never falls: no suggestion
    # a noisy start (one batch's spike while the average holds few batches) falls faster than the real fall: skipped
    noisy = [v + (1.0 if i == 2 else 0.0) for i, v in enumerate(rising)]
    assert suggest(lrs, noisy, skip=0) < 1e-5 and suggest(lrs, noisy, skip=warm_up(0.9, 61)) == pytest.approx(1e-3, rel=0.3)
    assert warm_up(0.9, 100) == 10 and warm_up(0.9, 12) == 4 and warm_up(0.98, 100) == 33
    # CTC from scratch, in shape: a plateau, a short steep collapse (to blanks) near 1e-4, then a long slow fall (learning
    # to read) to the lowest point at 5e-2, then divergence. steepest picks the collapse; valley the long fall's middle
    ctc = [3 + 9 * (1 - math.tanh(8 * (math.log10(lr) + 4))) / 2 - 1.5 * max(0.0, min(1.0, (math.log10(lr) + 4) / 2.7))
           for lr in lrs]
    ctc = [v if lr <= 5.1e-2 else ctc[i - 1] + 0.5 for i, (lr, v) in enumerate(zip(lrs, ctc, strict=True))]
    assert suggest(lrs, ctc, skip=10) == pytest.approx(1e-4, rel=0.3)
    assert valley(lrs, ctc, skip=10) == pytest.approx(math.sqrt(5e-5 * 5e-2), rel=0.6)  # ~1.6e-3
    assert tenth_of_lowest(lrs, ctc, skip=10) == pytest.approx(5e-3, rel=0.3)
    # the tanh fall: 5 % of its drop by 1.8e-4, lowest at 7.9e-2 (then it diverges): middle ~3.8e-3
    assert valley(lrs, rising, skip=10) == pytest.approx(math.sqrt(1.8e-4 * 7.9e-2), rel=0.3)
    for rule in (valley, tenth_of_lowest):  # never falls: no suggestion
        assert rule(lrs, [1.0 + 0.01 * i for i in range(61)], skip=10) is None
    result = RangeResult(lrs=lrs, smoothed=ctc, losses=ctc)
    result.read(RangeTest(smoothing=0.9, rule="valley"))
    assert result.suggestion == result.suggestions["valley"] == valley(lrs, ctc, skip=warm_up(0.9, 61))
    assert set(result.suggestions) == {"steepest", "valley", "minimum"}
    from omegaconf import OmegaConf

    from run import lr_find

    smoke = OmegaConf.create({"tune": {"lr_find": {}}, "trainer": {"fast_dev_run": True}, "optimizer": {"lr": 1e-4}})
    assert lr_find.run(smoke, parts=None, checkpoint=None) is None  # a smoke run is not swept (nothing is built)
    for node, message in [({"steps": 5}, "needs at least 10 optimizer steps"), ({"min_lr": 1, "max_lr": 0.1}, "0 < min_lr < max_lr"),
                          ({"max_steps": 10}, r"tune.lr_find has no \['max_steps'\]"),
                          ({"rule": "lowest"}, "rule='lowest' is not a rule; choose one of steepest, valley, minimum")]:
        with pytest.raises(ConfigError, match=message):
            RangeTest.from_config(node)


def out_of_memory_above(monkeypatch: pytest.MonkeyPatch, rows: int) -> list[int]:
    """Every training step of more than ``rows`` examples raises the out-of-memory error a GPU would; returns the batch
    sizes the steps saw."""
    from modules.task import TaskModule

    seen: list[int] = []
    step = TaskModule.training_step

    def limited(self, batch, batch_idx):  # noqa: ANN001, ANN202
        seen.append(int(batch["labels"].shape[0]))
        if seen[-1] > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {seen[-1]} rows > {rows})")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(TaskModule, "training_step", limited)
    return seen


def test_batch_size_finder_finds_the_largest_that_fits_then_trains_as_if_given_it(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tune=batch_size: trials at 16, 32 fit, 64 runs out of memory, the bisection settles on 40 (a multiple of 8) with
    3 steps per trial on the longest texts; the run then trains bit for bit as a run given data.batch_size=40 (and the
    LR scaled as asked), and config.yaml, batch_find.json and batch_find.png say what was found."""
    import json

    from omegaconf import OmegaConf

    seen = out_of_memory_above(monkeypatch, 44)
    common = ["task.lr_decay=0.5", "finetune=gradual", "finetune.unit=step", "finetune.every=2", "trainer.max_steps=5",
              "optimizer.lr=1e-3"]
    tuned = tiny_run(tmp_path / "tuned", cache_dir, *common, "tune=batch_size", "tune.batch_size.scale_lr=sqrt",
                     "tune.batch_size.min_batches_per_epoch=1")
    trials = json.loads((tmp_path / "tuned" / "batch_find.json").read_text())
    assert [(t["batch_size"], t["fits"]) for t in trials["trials"]] == [
        (16, True), (32, True), (64, False), (48, False), (40, True)]
    assert "out of memory" in trials["trials"][2]["why"] and trials["found_batch_size"] == 40
    assert seen[:3] == [16] * 3 and seen[3:6] == [32] * 3  # 3 steps per trial, every one at the trial's size
    assert (tmp_path / "tuned" / "batch_find.png").stat().st_size > 1000
    cfg = OmegaConf.load(tmp_path / "tuned" / "config.yaml")
    assert cfg.data.batch_size == 40 and cfg.tune.batch_size.found == 40 and cfg.tune.batch_size.configured == 16
    assert cfg.optimizer.lr == pytest.approx(1e-3 * math.sqrt(40 / 16))
    given = tiny_run(tmp_path / "given", cache_dir, *common, "data.batch_size=40", f"optimizer.lr={cfg.optimizer.lr!r}")
    assert [s["lr"] for s in tuned["steps"]] == [s["lr"] for s in given["steps"]]
    for group in GROUPS:
        assert torch.equal(tuned["start"][group], given["start"][group]), group
        assert torch.equal(tuned["end"][group], given["end"][group]), group


def test_batch_size_finder_under_a_global_batch_picks_a_divisor_and_accumulates(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.global_batch_size=48 stays 48 samples per step: micro-batches above 20 run out of memory, so the finder takes
    16 (the largest divisor of 48 that fits) and the accumulation 3; the LR is untouched."""
    import json

    from omegaconf import OmegaConf

    out_of_memory_above(monkeypatch, 20)
    tiny_run(tmp_path, cache_dir, "tune=batch_size", "data.global_batch_size=48", "data.batch_size=4", "trainer.max_steps=2",
             "optimizer.lr=1e-3")
    trials = json.loads((tmp_path / "batch_find.json").read_text())
    assert [t["batch_size"] for t in trials["trials"]] == [4, 8, 16, 48, 24]  # doubling, then bisection
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches, cfg.optimizer.lr) == (16, 3, 1e-3)
    assert trials["accumulate_grad_batches"] == 3


def test_batch_size_search_bisects_halves_predicts_and_refuses_bad_settings() -> None:
    from run.batch_find import Finder, Trial, candidates, predicted_peak, search

    def up_to(limit: int, log: list[int]):  # noqa: ANN202
        def attempt(size: int) -> Trial:
            log.append(size)
            return Trial(size, size <= limit, "")
        return attempt

    sizes = candidates(16, Finder(max_batch_size=1024), None, 10_000)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 1024 and all(s % 8 == 0 for s in sizes[3:])
    for limit in (8, 100, 700, 1024, 5000):
        log: list[int] = []
        found, _ = search(sizes, 16, up_to(limit, log))
        assert found == max(s for s in sizes if s <= limit), limit
        assert len(log) == len(set(log)) <= 14, log  # each size once: doubling, then bisection
    log = []
    assert search(sizes, 16, up_to(3, log)) == (2, search(sizes, 16, up_to(3, []))[1]) and log[:3] == [16, 8, 4]
    assert search(sizes, 16, up_to(0, []))[0] is None  # not even one example fits
    assert candidates(4, Finder(), 48, 10_000) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert candidates(4, Finder(max_batch_size=20), 48, 10_000)[-1] == 16
    assert candidates(50, Finder(min_batches_per_epoch=1), None, 30)[-1] == 30  # never more than the training set
    assert candidates(64, Finder(), None, 1257)[-1] == 152  # 1257 examples: at least 8 batches an epoch (157 -> 152)
    assert candidates(4, Finder(), 48, 30)[-1] == 24  # a global batch: divisors of 48 up to the training set's 30
    gib = 2 ** 30  # 16 -> 1 GiB and 32 -> 2 GiB measured: 64 would take 4 GiB (a trial a CPU's OOM killer would end)
    assert predicted_peak([(16, gib)], 64) is None and predicted_peak([(32, 2 * gib), (16, gib)], 64) == 4 * gib
    for node, message in [({"steps": 1}, "needs 2 steps"), ({"memory_fraction": 1.5}, r"in \(0, 1\]"),
                          ({"scale_lr": "cubic"}, "none, sqrt, linear"),
                          ({"min_batches_per_epoch": 0}, "min_batches_per_epoch=0 must be"), ({"lr": 1}, r"tune.batch_size has no \['lr'\]")]:
        with pytest.raises(ConfigError, match=message):
            Finder.from_config(node)
    from omegaconf import OmegaConf

    from run import batch_find

    joint = OmegaConf.create({"tune": {"batch_size": {}}, "trainer": {"devices": 1}, "data": {"batch_size": None}})
    with pytest.raises(ConfigError, match="this data has none"):
        batch_find.check(joint)
    smoke = OmegaConf.create({"tune": {"batch_size": {}}, "trainer": {"fast_dev_run": True}, "data": {"batch_size": 8}})
    assert batch_find.run(smoke, parts=None, checkpoint=None) is None  # a smoke run is not sized (nothing is built)


def test_max_epochs_auto_gives_small_data_enough_steps_and_the_schedule_spans_them(tmp_path: Path, cache_dir: Path) -> None:
    """96 training texts in batches of 16, accumulation 2: 3 optimizer steps per epoch, so budget.min_steps=20 is 7
    epochs (21 steps); the linear decay runs over exactly those steps for every group (layer-wise decay on top)."""
    from omegaconf import OmegaConf

    state = tiny_run(tmp_path, cache_dir, "trainer.max_epochs=auto", "budget.min_steps=20", "trainer.accumulate_grad_batches=2",
                     "callbacks.early_stopping=null", "scheduler=linear", "scheduler.warmup=0", "task.lr_decay=0.5",
                     "optimizer.lr=1e-3")
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    assert cfg.trainer.max_epochs == 7
    assert cfg.budget.chosen.steps_per_epoch == 3 and cfg.budget.chosen.optimizer_steps == 21
    assert [s["step"] for s in state["steps"]] == list(range(21)) and state["steps"][-1]["epoch"] == 6
    for s in state["steps"]:
        decay = 1 - s["step"] / 21
        assert s["lr"]["block_2"] == pytest.approx(1e-3 * decay, rel=1e-9) and s["lr"]["block_1"] == pytest.approx(0.5e-3 * decay, rel=1e-9)


def test_budget_counts_processes_accumulation_and_limits_and_caps_the_epochs_and_the_time() -> None:
    from omegaconf import OmegaConf

    from run import budget

    def cfg(**trainer: object) -> object:
        base = {"max_epochs": "auto", "max_steps": -1, "devices": 2, "num_nodes": 1, "accelerator": "cpu",
                "accumulate_grad_batches": 2, "limit_train_batches": None}
        return OmegaConf.create({"trainer": {**base, **trainer}, "monitor": "val/acc",
                                 "budget": {"min_steps": 300, "max_epochs": 100, "minutes": None}})

    class Data:
        def train_dataloader(self) -> list:
            return [None] * 101  # 51 batches on each of 2 processes, 26 optimizer steps with accumulation 2

    run = cfg()
    assert budget.resolve(run, Data())["steps_per_epoch"] == 26 and run.trainer.max_epochs == 12  # ceil(300 / 26)
    run = cfg(limit_train_batches=0.5)
    assert budget.resolve(run, Data())["steps_per_epoch"] == 13 and run.trainer.max_epochs == 24
    run = cfg(limit_train_batches=4, devices=1)
    run.budget.max_epochs, run.budget.minutes = 50, 1.5
    chosen = budget.resolve(run, Data())
    assert chosen["steps_per_epoch"] == 2 and run.trainer.max_epochs == 50 and run.trainer.max_time == {"seconds": 90.0}
    run = cfg()
    run.budget.min_epochs = 20  # auto.py's trials: never fewer epochs than the preset's own
    chosen = budget.resolve(run, Data())
    assert run.trainer.max_epochs == 20 and "budget.min_epochs=20" in chosen["rule"]
    run = cfg()
    run.budget.min_epochs = 5
    assert budget.resolve(run, Data())["max_epochs"] == 12  # the steps' floor is higher
    run = cfg(max_epochs=3)
    assert budget.resolve(run, Data()) is None and run.trainer.max_epochs == 3  # a number stays a number
    for key, value, message in [("budget.min_steps", 0, r"budget.min_steps=0 must be a whole number >= 1"),
                                ("budget.minutes", -1, r"budget.minutes=-1 must be a number of minutes > 0"),
                                ("budget.min_epochs", 0, r"budget.min_epochs=0 must be a whole number >= 1"),
                                ("trainer.max_steps", 10, r"trainer.max_epochs=auto derives the epochs from the data, but "
                                                          r"trainer.max_steps=10 fixes the length too")]:
        run = cfg()
        OmegaConf.update(run, key, value)
        with pytest.raises(ConfigError, match=message):
            budget.check(run)


def test_unfrozen_groups_get_their_own_lr_and_warmup(tmp_path: Path, cache_dir: Path) -> None:
    state = tiny_run(tmp_path, cache_dir, "finetune=freeze_then_unfreeze", "finetune.unit=step", "finetune.at=2",
                     "finetune.unfreeze_lr=1e-5", "finetune.unfreeze_warmup=4", "scheduler=constant", "optimizer.lr=1e-3",
                     "trainer.max_steps=8")
    lr = {s["step"]: s["lr"] for s in state["steps"]}
    assert lr[0]["head"] == lr[7]["head"] == pytest.approx(1e-3)  # the head keeps the schedule
    for t in range(2, 8):
        assert lr[t]["block_1"] == pytest.approx(1e-5 * min(1.0, (t - 2 + 1) / 4)), t


def test_unfreeze_warmup_rides_on_a_decaying_schedule(tmp_path: Path, cache_dir: Path) -> None:
    """The hard case: gradual unfreezing by step with a warm-up per unfrozen group under a *linear decay*.
    Every group's LR follows the schedule at every step, with the warm-up factor on top while it lasts
    (the schedule must not freeze at its value of the first unfreezing)."""
    total = 12
    state = tiny_run(tmp_path, cache_dir, "finetune=gradual", "finetune.unit=step", "finetune.every=3",
                     "finetune.unfreeze_warmup=2", "scheduler=linear", "scheduler.warmup=0", "optimizer.lr=1e-3",
                     f"trainer.max_steps={total}")
    unfrozen_at = {"block_2": 3, "block_1": 6, "block_0": 9}
    assert [s["step"] for s in state["steps"]] == list(range(total))
    for s in state["steps"]:
        t, decay = s["step"], 1 - s["step"] / total
        assert s["lr"]["head"] == pytest.approx(1e-3 * decay, rel=1e-9), t
        for group, start in unfrozen_at.items():
            assert (group in s["trainable"]) == (t >= start), (t, group)
            warm = min(1.0, (t - start + 1) / 2) if t >= start else 1.0
            assert s["lr"][group] == pytest.approx(1e-3 * decay * warm, rel=1e-9), (t, group)


def test_parameters_outside_every_layer_group_are_refused(tmp_path: Path, cache_dir: Path) -> None:
    from torch import nn

    from run.build import build

    cfg = compose_config(tmp_path, [*TINY_SCRATCH, "trainer.max_steps=1"], cache_dir)
    backbone = build(cfg.backbone)
    backbone.adapter = nn.Linear(4, 4)  # a third-party adapter its layer_groups() forgot
    task = build(cfg.task, backbone=backbone, optimizer=build(cfg.optimizer), num_classes=5)
    with pytest.raises(ConfigError, match=r"2 parameters are in no layer group.*first: backbone.adapter.weight"):
        task.configure_optimizers()


def test_accumulation_and_clipping_are_plain_overrides(tmp_path: Path, cache_dir: Path) -> None:
    """Total steps for the schedule come from the trainer: accumulation halves them."""
    state = tiny_run(tmp_path, cache_dir, "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5",
                     "scheduler=linear", "scheduler.warmup=0", "optimizer.lr=1e-3", "trainer.max_epochs=1")
    steps = [s["step"] for s in state["steps"]]
    batches = math.ceil(96 / 16)
    assert steps == list(range(batches // 2))
    last = state["steps"][-1]["lr"]["head"]
    assert last == pytest.approx(1e-3 * (1 - (len(steps) - 1) / len(steps)))


def test_early_stopping_stops_when_the_metric_stalls(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [*TINY_SCRATCH, "test_after_fit=false", "trainer.max_epochs=20", "optimizer.lr=1e-7",
                 "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=0.5"]
    run_train(tmp_path, overrides, cache_dir)
    epochs = {s["epoch"] for s in probe(tmp_path)["steps"]}
    assert len(epochs) == 2  # no improvement of 0.5 in val/acc: stop after patience=1


# -- bad input ----------------------------------------------------------------------------------
def test_unknown_strategy_lists_strategies() -> None:
    with pytest.raises(ConfigError, match="finetune strategy 'ulmfit' is unknown; choose one of: full, linear_probe"):
        FinetuneSchedule(strategy="ulmfit")
    assert len(STRATEGIES) == 6


def test_unknown_finetune_option_in_config(tmp_path: Path) -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="gradual"):
        compose_config(tmp_path, ["finetune=nope"])


def test_unknown_group_in_milestones_lists_groups(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"names layer group 'block_9'.*its groups are: embeddings, block_0, block_1, block_2, head"):
        tiny_run(tmp_path, cache_dir, "finetune=milestones", "finetune.milestones=[{at: 1, groups: [block_9]}]")


def test_milestone_beyond_training_warns(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.warns(UserWarning, match=r"milestone at step 50 \(unfreezes .*\) is at or beyond the end of training \(3 steps\)"):
        tiny_run(tmp_path, cache_dir, "finetune=freeze_then_unfreeze", "finetune.unit=step", "finetune.at=50", "trainer.max_steps=3")


@pytest.mark.parametrize("decay", [0.0, 1.5, -0.1])
def test_lr_decay_outside_unit_interval_is_an_error(decay: float) -> None:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    from modules.backbones import LayerGroup

    with pytest.raises(ConfigError, match=rf"lr_decay={decay} must be in \(0, 1\]"):
        param_groups([LayerGroup("a", {"w": param}), LayerGroup("head", {})], lr=1e-3, weight_decay=0.0, lr_decay=decay)


def test_negative_warmup_is_an_error() -> None:
    from modules.schedules import linear

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match=r"scheduler.warmup=-5 must be >= 0"):
        partial(linear, warmup=-5)(opt, total_steps=10)


# the guard's two paths: a fused optimizer skips the update on the device and the verdict is read a step later (no
# host sync); any other optimizer gets the verdict at once (one sync) and drops the gradients
PATHS = [pytest.param("optimizer.fused=false", id="sync"), pytest.param("optimizer.fused=true", id="fused_no_sync")]


@pytest.mark.parametrize("path", PATHS)
def test_a_non_finite_step_stops_the_run_with_one_line(path: str, tmp_path: Path, cache_dir: Path) -> None:
    from modules.errors import TrainingError

    with pytest.raises(TrainingError, match=r"non-finite gradients \(loss .*\) at optimizer step 2 \(epoch 0\); lower "
                                            r"optimizer.lr.*on_nonfinite=skip"):
        tiny_run(tmp_path, cache_dir, "trainer.max_steps=4", path, "+callbacks.nan._target_=tests.probes.NaNGradAt",
                 "+callbacks.nan.step=2")


@pytest.mark.parametrize("path", PATHS)
def test_skip_policy_drops_the_step_and_counts_it(path: str, tmp_path: Path, cache_dir: Path) -> None:
    run_train(tmp_path, [*TINY_SCRATCH, "trainer.max_steps=4", "trainer.max_epochs=100", "on_nonfinite=skip", path,
                         "+callbacks.nan._target_=tests.probes.NaNGradAt", "+callbacks.nan.step=2"], cache_dir)
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["nonfinite/skipped"] == 1.0 and "nonfinite/stopped_at_step" not in metrics
    end = probe(tmp_path)["end"]
    assert all(bool(torch.isfinite(t).all()) for t in end.values())  # the poisoned step never reached the weights
    assert "test/acc" in metrics


@pytest.mark.parametrize("path", PATHS)
def test_stop_policy_ends_training_and_says_where(path: str, tmp_path: Path, cache_dir: Path) -> None:
    """Stopped at the poisoned step 2: the weights are those of the same run trained for exactly 2 steps (the fused
    path learns of step 2 during step 3, whose update it skips too)."""
    common = [*TINY_SCRATCH, "trainer.max_epochs=100", "test_after_fit=false", "scheduler=constant", path]  # LRs: any length
    metrics = run_train(tmp_path / "stopped", [*common, "trainer.max_steps=6", "on_nonfinite=stop",
                                               "+callbacks.nan._target_=tests.probes.NaNGradAt", "+callbacks.nan.step=2"],
                        cache_dir)
    assert metrics["nonfinite/stopped_at_step"] == 2.0
    state = probe(tmp_path / "stopped")
    assert [s["step"] for s in state["steps"]] == ([0, 1, 2] if "false" in path else [0, 1, 2, 3])
    run_train(tmp_path / "two_steps", [*common, "trainer.max_steps=2"], cache_dir)
    two = probe(tmp_path / "two_steps")["end"]
    for group, weights in state["end"].items():
        assert torch.equal(weights, two[group]), group


def test_under_a_loss_scaler_gradient_overflow_is_the_scalers_business() -> None:
    """fp16 with a real GradScaler and a forced overflow: the scaler skips the step and halves its scale, and the guard
    neither stops nor counts it; a non-finite loss still counts, and so does a scale that collapsed."""
    from types import SimpleNamespace

    from callbacks.nonfinite import NonFiniteGuard

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), world_size=1, global_step=5,
                              current_epoch=0, should_stop=False)
    guard = NonFiniteGuard("skip")
    before = model.weight.detach().clone()

    def step(loss: torch.Tensor, grad: float) -> None:
        guard.on_before_backward(trainer, model, scaler.scale(loss))
        for p in model.parameters():
            p.grad = torch.full_like(p, grad) * scaler.get_scale()
        scaler.unscale_(optimizer)  # what Lightning's precision plugin does before the hook
        guard.on_before_optimizer_step(trainer, model, optimizer)
        scaler.step(optimizer)
        scaler.update()

    step(torch.tensor(0.5), float("inf"))  # an overflow: routine under fp16
    guard.on_train_end(trainer, model)
    assert guard.skipped == 0 and scaler.get_scale() == 2.0**15 and torch.equal(model.weight, before)
    step(torch.tensor(float("nan")), float("nan"))  # a non-finite loss: counted
    guard.on_train_end(trainer, model)
    assert guard.skipped == 1
    scaler.update(new_scale=2.0**-20)  # step after step skipped: the scale collapsed
    step(torch.tensor(0.5), 1.0)
    guard.on_train_end(trainer, model)
    assert guard.skipped == 2


def test_a_huge_learning_rate_is_caught(tmp_path: Path, cache_dir: Path) -> None:
    """The reported case: optimizer.lr=1e6 used to exit 0 with a 'best' checkpoint; now it names the step."""
    from modules.errors import TrainingError

    with pytest.raises(TrainingError, match="non-finite"):
        tiny_run(tmp_path, cache_dir, "optimizer.lr=1e6", "trainer.max_steps=30")
