"""Knowledge distillation: a student classifier trained on a frozen teacher's softened outputs and on the labels.

    loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · CE(student, labels)
           [+ β · MSE(projection(student hidden states), teacher hidden states)]

The teacher is a tunelab run folder (or a checkpoint in one) of any classifier, or a Hugging Face sequence classifier
(local folder or hub name). Both read the same batch, so they must prepare inputs alike (text: the same tokenizer
vocabulary; images: the same input size and normalisation); its labels must be the data's (in any order). The teacher
is not a submodule of the student: it is never trained, never in the student's checkpoints, and always in eval mode.
Its logits are computed on the fly, or cached on disk (``cache_teacher``) under a key made of the teacher's identity
(its checkpoint / weight files, their sizes and modification times) and, per example, of the example's own inputs: a
changed teacher or changed data never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modules.backbones.base import Backbone
from modules.classifier import Classifier, label_loss
from modules.errors import ConfigError
from modules.layer_groups import LayerGroup

log = logging.getLogger(__name__)

INPUT_KEYS = ("input_ids", "token_type_ids", "pixel_values", "input_values")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE, the KL term, the CE term); KL averaged over the batch.

    T² keeps the soft term's gradient scale independent of T (Hinton et al., 2015). The CE term is the classifier's:
    label smoothing on hard labels; labels of shape (batch, num_classes) are soft targets (mixup/cutmix)."""
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher.to(student.dtype) / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    ce = label_loss(student, labels, label_smoothing)
    return alpha * kl + (1.0 - alpha) * ce, kl, ce


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference over real positions (all positions without a mask)."""
    err = (student - teacher.to(student.dtype)).pow(2).mean(-1)
    if mask is None:
        return err.mean()
    weights = mask.to(err.dtype)
    return (err * weights).sum() / weights.sum().clamp(min=1.0)


class Teacher(nn.Module):
    """A frozen classifier in eval mode: logits in the data's label order, and its last hidden states.

    Args:
        model: a tunelab classifier (``kind="tunelab"``) or a ``transformers`` sequence classifier (``kind="hf"``).
        order: for each of the data's labels, the teacher's output index.
        identity: what makes its outputs what they are (files, sizes, times): the logit cache key.
    """

    def __init__(self, model: nn.Module, kind: str, order: Sequence[int], width: int, identity: str, source: str) -> None:
        super().__init__()
        self.model, self.kind, self.width, self.identity, self.source = model, kind, width, identity, source
        self.register_buffer("order", torch.tensor(list(order), dtype=torch.long), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:  # always in eval mode (dropout off, BatchNorm statistics fixed)
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, last hidden states, their mask)."""
        if self.kind == "tunelab":
            out = self.model.backbone(batch)
            logits, hidden, mask = self.model.head(out.pooled), out.features, out.mask
        else:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values") if k in batch}
            out = self.model(**inputs, output_hidden_states=True)
            logits, hidden, mask = out.logits, out.hidden_states[-1], batch.get("attention_mask")
        return logits.index_select(-1, self.order), hidden, mask

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def file_identity(paths: Sequence[Path]) -> str:
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(paths) if p.is_file())


def vocabulary(processor: Any) -> dict[str, int] | None:
    return processor.get_vocab() if hasattr(processor, "get_vocab") else None


def check_same_inputs(source: str, teacher_processor: Any, student_processor: Any) -> None:
    """The teacher reads the student's batches: the same tokenizer vocabulary, or the same image preparation."""
    mine, theirs = vocabulary(student_processor), vocabulary(teacher_processor)
    if mine is not None and theirs is not None and mine != theirs:
        raise ConfigError(f"task.teacher={source!r} uses another tokenizer ({len(theirs)} tokens) than the student "
                          f"({len(mine)}); both read the same batches: give the student the teacher's tokenizer "
                          "(backbone.tokenizer=<the teacher's>)")
    if isinstance(student_processor, Mapping) and isinstance(teacher_processor, Mapping):
        keys = ("input_size", "mean", "std")
        differ = [k for k in keys if tuple(student_processor.get(k, ())) != tuple(teacher_processor.get(k, ()))]
        if differ:
            raise ConfigError(f"task.teacher={source!r} prepares images differently from the student ({', '.join(differ)}: "
                              f"{[teacher_processor.get(k) for k in differ]} vs {[student_processor.get(k) for k in differ]}); "
                              "set the student's backbone.data_config to the teacher's")


def label_order(source: str, teacher_labels: Sequence[str], data_labels: Sequence[str]) -> list[int]:
    """For each of the data's labels, the teacher's output index; the label sets must be equal."""
    if sorted(map(str, teacher_labels)) != sorted(map(str, data_labels)):
        only_teacher = sorted(set(map(str, teacher_labels)) - set(map(str, data_labels)))
        only_data = sorted(set(map(str, data_labels)) - set(map(str, teacher_labels)))
        raise ConfigError(f"task.teacher={source!r} predicts other labels than the data has (teacher only: "
                          f"{', '.join(only_teacher[:5]) or '-'}; data only: {', '.join(only_data[:5]) or '-'}); "
                          "distil from a teacher trained on the same label set")
    position = {str(name): i for i, name in enumerate(teacher_labels)}
    return [position[str(name)] for name in data_labels]


class TeacherLogitCache:
    """Teacher logits on disk, one entry per example keyed by a hash of its inputs (padding left out), in a file
    keyed by the teacher's identity; filled as batches come, written by ``save``. One file per process."""

    def __init__(self, folder: str | Path, identity: str, rank: int = 0) -> None:
        key = hashlib.sha1(identity.encode()).hexdigest()[:16]
        self.folder = Path(folder).expanduser()
        self.path = self.folder / f"{key}.rank{rank}.pt"
        self.entries: dict[str, torch.Tensor] = {}
        for file in sorted(self.folder.glob(f"{key}.rank*.pt")) if self.folder.is_dir() else []:
            self.entries.update(torch.load(file, map_location="cpu", weights_only=True))
        self.hits = self.misses = 0
        self._dirty = False

    @staticmethod
    def keys(batch: Mapping[str, torch.Tensor]) -> list[str]:
        mask = batch.get("attention_mask")
        size = next(batch[k] for k in INPUT_KEYS if k in batch).shape[0]
        out = []
        for i in range(size):
            digest = hashlib.sha1()
            for name in INPUT_KEYS:
                if name in batch:
                    row = batch[name][i]
                    if mask is not None and row.shape[:1] == mask[i].shape:
                        row = row[mask[i].bool()]
                    digest.update(name.encode())
                    digest.update(row.detach().cpu().contiguous().numpy().tobytes())
            out.append(digest.hexdigest())
        return out

    def get(self, keys: Sequence[str]) -> torch.Tensor | None:
        if all(k in self.entries for k in keys):
            self.hits += len(keys)
            return torch.stack([self.entries[k] for k in keys])
        self.misses += len(keys)
        return None

    def put(self, keys: Sequence[str], logits: torch.Tensor) -> None:
        for key, row in zip(keys, logits.detach().float().cpu(), strict=True):
            self.entries[key] = row.clone()
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(self.entries, tmp)
        os.replace(tmp, self.path)
        self._dirty = False


def teacher_cache(folder: str | Path, teacher: Teacher, rank: int = 0) -> TeacherLogitCache:
    """The logit cache of ``teacher`` as this run's data orders the labels: the stored logits are permuted into that
    order already, so another order (data whose labels come otherwise) is another cache."""
    return TeacherLogitCache(folder, f"{teacher.identity};order={teacher.order.tolist()}", rank)


class DistillationClassifier(Classifier):
    """A student classifier distilled from a teacher (see the module docstring).

    Args:
        teacher: a tunelab run folder / checkpoint, or a Hugging Face sequence classifier (folder or hub name); None
            only to rebuild a trained student for inference (eval.py, predict.py, export.py).
        teacher_loader: ``(teacher, the data's label names, the student's processor) -> Teacher``; the config sets
            ``run.trained.load_teacher`` (the run lifecycle loads trained runs; the model only uses them).
        alpha: weight of the soft (teacher) term, in [0, 1]; 0 trains on the labels alone (the no-KD baseline).
        temperature: softens both distributions (> 0).
        hidden_weight: β of the hidden-state term (0: off): the student's last hidden states, through a learned
            projection when the widths differ, regress the teacher's (positions matched when the lengths agree, else
            the mean over positions).
        cache_teacher: keep the teacher's logits on disk in ``cache_dir`` (reused by later epochs and runs).
        teacher_width: the teacher's hidden width (filled in from the teacher; kept for inference).
        evaluate_teacher: also log the teacher's accuracy on the test split (``test/teacher_acc``).
        for_inference: rebuild a trained student without its teacher (set by ``inference_kwargs``).
    """

    NOT_HYPERPARAMETERS = (*Classifier.NOT_HYPERPARAMETERS, "teacher_loader")

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        teacher: str | None = None,
        teacher_loader: Callable[[str, Sequence[str], Any], Teacher] | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden_weight: float = 0.0,
        cache_teacher: bool = False,
        cache_dir: str | None = None,
        teacher_width: int | None = None,
        evaluate_teacher: bool = True,
        for_inference: bool = False,
        dropout: float = 0.1,
        label_smoothing: float = 0.0,
        **task_kwargs: Any,
    ) -> None:
        for name, value in (("alpha", alpha), ("temperature", temperature), ("hidden_weight", hidden_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"task.{name}={value!r} must be a number")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"task.alpha={alpha} must be in [0, 1] (the weight of the teacher's soft targets; 0: labels only)")
        if temperature <= 0:
            raise ConfigError(f"task.temperature={temperature} must be > 0 (1: the teacher's own probabilities; 2-4 is usual)")
        if hidden_weight < 0:
            raise ConfigError(f"task.hidden_weight={hidden_weight} must be >= 0 (0: no hidden-state transfer)")
        if not teacher and not for_inference:
            raise ConfigError("task=distillation needs a teacher: task.teacher=<a tunelab run folder or checkpoint, or a Hugging "
                              "Face sequence classifier folder / hub name>")
        if teacher and teacher_loader is None:
            raise ConfigError("task.teacher is set but task.teacher_loader is not; configs/task/distillation.yaml sets it "
                              "(run.trained.load_teacher)")
        if cache_teacher and hidden_weight > 0:
            raise ConfigError("task.cache_teacher=true caches logits only, but task.hidden_weight > 0 needs the teacher's hidden "
                              "states at every step; set one of them off")
        super().__init__(backbone, num_classes, label_names, dropout, label_smoothing, **task_kwargs)
        self.alpha, self.temperature, self.hidden_weight = float(alpha), float(temperature), float(hidden_weight)
        self.evaluate_teacher = evaluate_teacher
        found = teacher_loader(teacher, self.label_names, backbone.processor) if teacher else None
        object.__setattr__(self, "_teacher", found)  # not a submodule: never trained, never checkpointed
        if found is not None:
            teacher_width = found.width
            self.hparams["teacher_width"] = teacher_width
        self.hidden_projection: nn.Module = nn.Identity()
        if hidden_weight > 0 and teacher_width and teacher_width != backbone.feature_dim:
            self.hidden_projection = nn.Linear(backbone.feature_dim, int(teacher_width))
        self.cache = teacher_cache(cache_dir or "teacher_logits", found) if cache_teacher and found else None
        self.teacher_metric = classification_accuracy(num_classes)

    @classmethod
    def inference_kwargs(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """What rebuilding a trained student needs instead of its teacher (eval.py, predict.py, export.py)."""
        return {"teacher": None, "cache_teacher": False, "teacher_width": hparams.get("teacher_width"), "for_inference": True}

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher

    def layer_groups(self) -> list[LayerGroup]:
        """The head group also holds the hidden-state projection (it is trained from scratch, like the head)."""
        groups = super().layer_groups()
        groups[-1].params.update({f"hidden_projection.{n}": p for n, p in self.hidden_projection.named_parameters()})
        return groups

    def forward(self, batch: dict[str, torch.Tensor], with_features: bool = False) -> Any:
        """Logits; with ``with_features``, (logits, the backbone's output)."""
        out = self.backbone(batch)
        logits = self.head(out.pooled)
        return (logits, out) if with_features else logits

    def _place_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_fit_start(self) -> None:
        self._place_teacher()
        if self.cache is not None and self.trainer is not None:
            rank = self.trainer.global_rank
            if rank and self.cache.path.name.endswith(".rank0.pt"):
                self.cache.path = self.cache.path.with_name(self.cache.path.name.replace(".rank0.pt", f".rank{rank}.pt"))

    def on_test_start(self) -> None:
        self._place_teacher()
        self.teacher_metric.reset()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.cache is not None:
            self.cache.save()

    def on_fit_end(self) -> None:
        if self.cache is not None:
            self.cache.save()
            log.info(f"teacher logits: {self.cache.hits} read from the cache, {self.cache.misses} computed ({self.cache.path})")

    def teacher_outputs(self, batch: Mapping[str, torch.Tensor], need_hidden: bool) -> tuple[torch.Tensor, Any, Any]:
        """(teacher logits, hidden states, mask): logits from the cache when every example of the batch is there."""
        if self.cache is not None and not need_hidden:
            keys = self.cache.keys(batch)
            cached = self.cache.get(keys)
            if cached is not None:
                return cached.to(self.device), None, None
            logits, hidden, mask = self.teacher(batch)
            self.cache.put(keys, logits)
            return logits, hidden, mask
        return self.teacher(batch)

    def kd_loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor, out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its parts, for a batch whose student logits and backbone output are given."""
        labels = batch["labels"]
        use_teacher = self.teacher is not None and (self.alpha > 0 or self.hidden_weight > 0)
        if not use_teacher:  # alpha = 0 (the baseline), or no teacher: the classifier's own loss
            ce = label_loss(logits, labels, self.label_smoothing)
            return ce, {"ce": ce}
        need_hidden = self.hidden_weight > 0
        teacher_logits, hidden, mask = self.teacher_outputs(batch, need_hidden)
        loss, kl, ce = distillation_loss(logits, teacher_logits, labels, self.alpha, self.temperature, self.label_smoothing)
        parts = {"kd": kl, "ce": ce}
        if need_hidden:
            mine = self.hidden_projection(out.features)
            if mine.shape[:2] == hidden.shape[:2]:
                transfer = masked_mse(mine, hidden, out.mask if out.mask is not None else mask)
            else:  # other lengths (e.g. another patch grid): match the mean over positions
                transfer = F.mse_loss(mine.mean(1), hidden.mean(1).to(mine.dtype))
            loss = loss + self.hidden_weight * transfer
            parts["hidden"] = transfer
        return loss, parts

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if stage != "train":  # validation / test: the student as a classifier (val/loss is its cross-entropy)
            loss = super().step(batch, stage)
            if stage == "test" and self.teacher is not None and self.evaluate_teacher:
                teacher_logits, _, _ = self.teacher(batch)
                self.teacher_metric.update(teacher_logits, batch["labels"])
                self.log("test/teacher_acc", self.teacher_metric, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
            return loss
        logits, out = self(batch, with_features=True)
        loss, parts = self.kd_loss(batch, logits, out)
        labels = batch["labels"]  # soft targets (mixup/cutmix): the metrics score the top class
        self.train_metrics.update(logits.detach(), labels.argmax(-1) if labels.ndim == 2 else labels)
        size = len(batch["labels"])
        self.log("train/loss", loss, prog_bar=self.shows_progress, on_step=True, on_epoch=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=size)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=size)
        return loss


def classification_accuracy(num_classes: int) -> Any:
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(num_classes, average="micro")
