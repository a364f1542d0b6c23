"""A trained task in the formats other tools load, each checked against the task itself on the run's own data.

* ``hf``: a Hugging Face folder (safetensors): a text classifier for ``AutoModelForSequenceClassification``
  (tunelab's pooling ships as ``modeling_tunelab.py``: ``trust_remote_code=True``), a CTC recogniser for
  ``AutoModelForCTC`` + ``AutoProcessor``, a masked LM for ``AutoModelForMaskedLM``; an image classifier as a timm
  folder (``model.safetensors`` + ``config.json`` with its ``pretrained_cfg``) for ``timm.create_model("local-dir:...")``.
* ``onnx``: the task's forward (logits; CTC: log-probabilities and frame counts) with dynamic batch and
  sequence/time axes, checked with onnxruntime.
* ``torchscript``: ``torch.jit.trace``, kept only when the traced module also matches on a batch of another shape.
* ``backbone`` (only when named): the backbone alone in the Hugging Face format (``AutoModel`` + its tokenizer or
  feature extractor), a later run's ``backbone.name_or_path``. ``export_backbone=`` in ``train.py`` and WiSE-FT's best
  backbone are written by the same ``modules.backbones.save_backbone``.

Every export is run on two real batches of different shapes (16 and 15 examples) and compared with the task's own
outputs, computed before anything is changed for the export (a LoRA run's adapters are merged after: a wrong merge
fails the check). The difference is relative to the output's scale (largest absolute difference / largest absolute
output), within ``TOLERANCE`` for the model's dtype; both figures go to ``export_report.json``, and a difference
above the tolerance is an error.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.errors import ConfigError
from run.trained import rebuild_backbone

log = logging.getLogger("tunelab")

# what --format all exports (the task); "backbone" only when named
TASK_FORMATS = ("hf", "onnx", "torchscript")
FORMATS = (*TASK_FORMATS, "backbone")
# the largest difference, relative to the output's scale, an export may show: by the dtype the model computes in
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 2e-2}
INPUTS = {"text": ("input_ids", "attention_mask"), "image": ("pixel_values",), "audio": ("input_values", "attention_mask")}
# masked-LM heads in transformers: where tunelab's dense / LayerNorm / output bias go
MLM_HEADS = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
    "xlm-roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
    "camembert": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
}


class TaskForExport(nn.Module):
    """The task's forward on plain tensors: what ONNX and TorchScript record."""

    def __init__(self, task: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.task, self.names = task, tuple(names)
        self.kind = str(getattr(type(task), "data_kind", ""))

    def forward(self, *tensors: torch.Tensor) -> Any:
        batch = dict(zip(self.names, tensors, strict=True))
        if self.kind == "mlm":
            return self.task.dense_logits(batch)
        return self.task(batch)  # classifiers: logits; CTC: (log-probabilities, frames per example)


def outputs_of(value: Any) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def max_difference(expected: Sequence[torch.Tensor], got: Sequence[Any]) -> tuple[float, float]:
    """(largest absolute difference, the same relative to the output's scale) over all outputs, in float64; an
    output's scale is its largest absolute value (differences of exact outputs, frame counts, stay 0)."""
    absolute = relative = 0.0
    for a, b in zip(expected, got, strict=True):
        b = torch.as_tensor(b)
        if tuple(a.shape) != tuple(b.shape):
            return float("inf"), float("inf")
        if not a.numel():
            continue
        worst = float((a.double() - b.double()).abs().max())
        scale = float(a.double().abs().max())
        absolute = max(absolute, worst)
        relative = max(relative, worst / scale if scale > 0 else worst)
    return absolute, relative


def classifier_linear(task: nn.Module) -> nn.Linear:
    """The classification head's linear layer (a joint classifier's target head)."""
    head = task.head
    if isinstance(head, nn.ModuleDict):
        head = head[task.target]
    return head.linear


def prefixed(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new + k[len(old):]: v for k, v in state.items() if k.startswith(old)}


class Exporter:
    """Exports one loaded run (``run.trained.TrainedRun``); ``batches`` are real inputs of two shapes."""

    def __init__(self, run: Any, batches: Sequence[dict[str, Any]]) -> None:
        self.run, self.task = run, run.model.cpu().eval()
        self.kind = run.kind
        self.modality = str(getattr(self.task.backbone, "modality", ""))
        self.names = INPUTS[self.modality]
        self.batches = [{k: batch[k] for k in self.names if k in batch} for batch in batches]
        self.wrapper = TaskForExport(self.task, self.names).eval()
        data = run.data_node
        self.max_length = int(data.get("max_length") or data.get("block_size") or 512)
        if self.modality == "text":  # the exported tokenizer truncates where the run did (pipelines use this)
            self.task.backbone.processor.model_max_length = self.max_length
        with torch.inference_mode():
            self.expected = [[t.detach() for t in outputs_of(self.wrapper(*self.args(b)))] for b in self.batches]

    def args(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(batch[name] for name in self.names)

    @property
    def tolerance(self) -> float:
        """The relative difference allowed for the dtype the task computes in."""
        dtype = next((p.dtype for p in self.task.parameters() if p.is_floating_point()), torch.float32)
        return TOLERANCE.get(dtype, TOLERANCE[torch.float32])

    def check(self, what: str, run: Callable[[dict[str, torch.Tensor]], Sequence[Any]], compare: int | None = None) -> dict[str, list[float]]:
        """``run`` on each batch vs the task's outputs (the first ``compare`` outputs); raise above the tolerance.
        Returns the per-batch largest absolute and relative differences."""
        absolute, relative = [], []
        for batch, expected in zip(self.batches, self.expected, strict=True):
            with torch.inference_mode():
                got = list(run(batch))
            a, r = max_difference(expected[:compare or len(expected)], got[:compare or len(expected)])
            absolute.append(a)
            relative.append(r)
        shapes = ", ".join("x".join(map(str, b[self.names[0]].shape)) for b in self.batches)
        if max(relative) > self.tolerance:
            raise ConfigError(f"the {what} export does not reproduce the model: max difference {max(relative):.3g} of the "
                              f"output's scale (tolerance {self.tolerance:g}; absolute {max(absolute):.3g}) on inputs {shapes}; "
                              "please report it, and use another --format")
        log.info(f"{what}: max difference {max(relative):.2e} of the output's scale vs the task on inputs {shapes}")
        return {"max_abs_difference": absolute, "max_relative_difference": relative}

    # -- Hugging Face / timm ------------------------------------------------------------------------
    def hf(self, out: Path) -> dict[str, Any]:
        if self.modality == "image":
            return self.timm(out)
        if self.kind in ("classification", "joint_classification"):
            return self.hf_text_classifier(out)
        if self.kind == "ctc":
            return self.hf_ctc(out)
        if self.kind == "mlm":
            return self.hf_masked_lm(out)
        if self.kind == "token_classification":
            return self.hf_token_classifier(out)
        raise ConfigError(unsupported(self.run, "hf") or f"--format hf: no Hugging Face class for a {self.kind} task")

    def hf_text_classifier(self, out: Path) -> dict[str, Any]:
        from run.modeling_tunelab import TunelabForSequenceClassification, TunelabTextClassifierConfig

        backbone = self.task.backbone
        labels = list(self.task.label_names)
        linear = classifier_linear(self.task)
        config = TunelabTextClassifierConfig(
            encoder=backbone.model.config.to_dict(), pooling=backbone.pooling, classifier_dropout=float(self.dropout_p()),
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
            architectures=["TunelabForSequenceClassification"],
            auto_map={"AutoConfig": "modeling_tunelab.TunelabTextClassifierConfig",
                      "AutoModelForSequenceClassification": "modeling_tunelab.TunelabForSequenceClassification"})
        model = TunelabForSequenceClassification(config).eval()
        state = {**prefixed(backbone.model.state_dict(), "", "encoder."), "classifier.weight": linear.weight,
                 "classifier.bias": linear.bias}
        model.load_state_dict(state, strict=True)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        shutil.copy(Path(__file__).with_name("modeling_tunelab.py"), out / "modeling_tunelab.py")
        backbone.processor.save_pretrained(out)
        differences = self.check("Hugging Face", lambda b: [model(**b).logits])
        return {"loads_with": "transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)",
                **differences}

    def hf_ctc(self, out: Path) -> dict[str, Any]:
        from transformers import AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2Processor

        backbone, head = self.task.backbone, self.task.head
        config = copy.deepcopy(backbone.model.config)
        tokens = list(self.task.vocab.tokens)
        config.update({"vocab_size": len(tokens), "pad_token_id": self.task.vocab.blank_id, "ctc_loss_reduction": "mean",
                       "ctc_zero_infinity": True, "final_dropout": float(head.dropout.p), "architectures": None})
        model = AutoModelForCTC.from_config(config).eval()
        prefix = model.base_model_prefix
        state = {**prefixed(backbone.model.state_dict(), "", f"{prefix}."), "lm_head.weight": head.linear.weight,
                 "lm_head.bias": head.linear.bias}
        model.load_state_dict(state, strict=True)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        vocab = out / "vocab.json"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|",
                                         bos_token=None, eos_token=None, do_lower_case=False)
        Wav2Vec2Processor(feature_extractor=backbone.processor, tokenizer=tokenizer).save_pretrained(out)
        use_mask = backbone.pass_attention_mask

        def run(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            logits = model(batch["input_values"], attention_mask=batch["attention_mask"] if use_mask else None).logits
            return [torch.log_softmax(logits.float(), dim=-1)]

        differences = self.check("Hugging Face", run, compare=1)
        return {"loads_with": "transformers.AutoModelForCTC.from_pretrained(folder) + AutoProcessor.from_pretrained(folder)",
                **differences}

    def hf_masked_lm(self, out: Path) -> dict[str, Any]:
        from transformers import AutoModelForMaskedLM

        backbone, head = self.task.backbone, self.task.head
        config = copy.deepcopy(backbone.model.config)
        names = MLM_HEADS[config.model_type]  # unsupported() refused the others
        config.update({"architectures": None, "tie_word_embeddings": True})
        model = AutoModelForMaskedLM.from_config(config).eval()
        prefix = model.base_model_prefix
        dense, norm, bias = names
        state = {**prefixed(backbone.model.state_dict(), "", f"{prefix}."),
                 f"{dense}.weight": head.dense.weight, f"{dense}.bias": head.dense.bias,
                 f"{norm}.weight": head.norm.weight, f"{norm}.bias": head.norm.bias, bias: head.bias}
        result = model.load_state_dict(state, strict=False)
        untied = [k for k in result.missing_keys if not k.endswith(("decoder.weight", "decoder.bias"))]
        if untied or result.unexpected_keys:
            raise ConfigError(f"--format hf: the {config.model_type} masked-LM head does not match tunelab's "
                              f"(missing {untied[:3]}, unexpected {result.unexpected_keys[:3]}); use --format onnx")
        model.tie_weights()
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        backbone.processor.save_pretrained(out)
        differences = self.check("Hugging Face", lambda b: [model(**b).logits])
        return {"loads_with": "transformers.AutoModelForMaskedLM.from_pretrained(folder)", **differences}

    def hf_token_classifier(self, out: Path) -> dict[str, Any]:
        """``AutoModelForTokenClassification``: transformers' token classifiers are the encoder, dropout and one linear
        layer on every token's hidden state, which is tunelab's head; the tag names go to ``id2label``."""
        from transformers import AutoModelForTokenClassification

        backbone, head = self.task.backbone, self.task.head
        config = copy.deepcopy(backbone.model.config)
        names = list(self.task.label_names)
        config.update({"architectures": None, "num_labels": len(names), "id2label": dict(enumerate(names)),
                       "label2id": {n: i for i, n in enumerate(names)}, "classifier_dropout": float(head.dropout.p)})
        model = AutoModelForTokenClassification.from_config(config).eval()
        prefix = model.base_model_prefix
        classifier = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                           and m.out_features == len(names) and not n.startswith(prefix)), None)
        state = {**prefixed(backbone.model.state_dict(), "", f"{prefix}.")}
        if classifier is not None:
            state.update({f"{classifier}.weight": head.linear.weight, f"{classifier}.bias": head.linear.bias})
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        if classifier is None or missing:
            raise ConfigError(f"--format hf: the {config.model_type} token classifier of transformers does not match "
                              f"tunelab's (missing {missing[:3] or ['a linear classifier']}); use --format onnx")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)  # the pooler is not used
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        backbone.processor.save_pretrained(out)
        differences = self.check("Hugging Face", lambda b: [model(**{k: b[k] for k in self.names if k in b}).logits])
        return {"loads_with": "transformers.AutoModelForTokenClassification.from_pretrained(folder) (pipeline("
                "'token-classification', model=folder, aggregation_strategy='first'))", **differences}

    def timm(self, out: Path) -> dict[str, Any]:
        import timm
        from timm.models import save_for_hf

        backbone = self.task.backbone
        labels = list(self.task.label_names)
        from omegaconf import OmegaConf

        kwargs = OmegaConf.to_container(self.run.cfg.backbone.get("model_kwargs") or OmegaConf.create({}), resolve=True)
        model = timm.create_model(backbone.model_name, pretrained=False, num_classes=len(labels), **kwargs).eval()
        classifier = model.pretrained_cfg.get("classifier") or "head"  # unsupported() refused tuples (two heads)
        linear = classifier_linear(self.task)
        state = {**backbone.model.state_dict(), f"{classifier}.weight": linear.weight, f"{classifier}.bias": linear.bias}
        model.load_state_dict(state, strict=True)
        out.mkdir(parents=True, exist_ok=True)
        # the data config the run trained with (input size, mean/std, crop) goes into the saved pretrained_cfg
        save_for_hf(model, out, model_config={"label_names": labels}, model_args=kwargs or None,
                    data_config=dict(backbone.processor), safe_serialization=True)
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # as a user loads it
        differences = self.check("timm", lambda b: [loaded(b["pixel_values"])])
        return {"loads_with": f"timm.create_model('local-dir:{out}')", **differences}

    def backbone(self, out: Path) -> dict[str, Any]:
        """The backbone alone, in the Hugging Face format; checked by loading it with ``AutoModel``."""
        from transformers import AutoModel

        from modules.backbones import save_backbone

        backbone = self.task.backbone
        save_backbone(backbone, out)
        if getattr(backbone, "input_time_axis", 1) == 2:  # a Whisper encoder: WhisperModel holds it, fed at real length
            return self.whisper_backbone(out)
        loaded = AutoModel.from_pretrained(out).eval()
        pass_mask = getattr(backbone, "pass_attention_mask", True)

        def features(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            inputs = {k: v for k, v in batch.items() if k != "attention_mask" or pass_mask}
            if "input_values" in inputs:
                return model(inputs.pop("input_values"), **inputs).last_hidden_state
            return model(**inputs).last_hidden_state

        expected = self.expected
        self.expected = [[features(backbone.model, b)] for b in self.batches]
        try:
            differences = self.check("backbone", lambda b: [features(loaded, b)])
        finally:
            self.expected = expected
        return {"loads_with": "transformers.AutoModel.from_pretrained(folder) (+ AutoTokenizer / AutoFeatureExtractor)",
                **differences}

    def whisper_backbone(self, out: Path) -> dict[str, Any]:
        """The saved Whisper folder read back by the adapter (``backbone=whisper backbone.name_or_path=folder``)."""
        from modules.backbones.whisper import WhisperEncoderBackbone

        backbone = self.task.backbone
        loaded = WhisperEncoderBackbone(name_or_path=str(out), pad_to_30s=backbone.pad_to_30s).eval()
        expected = self.expected
        self.expected = [[backbone(b).features] for b in self.batches]
        try:
            differences = self.check("backbone", lambda b: [loaded(b).features])
        finally:
            self.expected = expected
        return {"loads_with": "transformers.WhisperModel.from_pretrained(folder).encoder, or tunelab's backbone=whisper "
                              "backbone.name_or_path=folder (clips at their real length)", **differences}

    def dropout_p(self) -> float:
        head = self.task.head[self.task.target] if isinstance(self.task.head, nn.ModuleDict) else self.task.head
        return float(head.dropout.p)

    # -- ONNX and TorchScript ------------------------------------------------------------------------
    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        from torch.export import Dim

        batch = Dim("batch", min=1, max=4096)
        if self.modality == "image":
            return {"pixel_values": {0: batch}}
        if self.modality == "audio":
            time = Dim("time")  # the conv front end's own minimum applies (wav2vec2: 400 samples)
            axis = getattr(self.task.backbone, "input_time_axis", 1)  # Whisper: (batch, mel bins, frames)
            return {"input_values": {0: batch, axis: time}, "attention_mask": {0: batch, 1: time}}
        limit = int(getattr(self.task.backbone.model.config, "max_position_embeddings", 512) or 512)
        sequence = Dim("sequence", min=2, max=limit)
        return {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}

    def too_big_for_one_file(self) -> bool:
        """ONNX files hold at most 2 GB of protobuf: bigger models keep their weights in ``model.onnx.data``."""
        return sum(p.numel() * p.element_size() for p in self.task.parameters()) > 1.8e9

    def output_names(self) -> list[str]:
        return {"ctc": ["log_probs", "frames"], "mlm": ["logits"]}.get(self.kind, ["logits"])

    def onnx(self, out: Path) -> dict[str, Any]:
        import onnxruntime

        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.onnx"
        example = self.args(self.batches[0])
        dynamic = self.dynamic_shapes()
        try:
            torch.onnx.export(self.wrapper, example, str(path), dynamo=True, input_names=list(self.names),
                              output_names=self.output_names(), dynamic_shapes=(tuple(dynamic[n] for n in self.names),),
                              external_data=self.too_big_for_one_file(), verbose=False)
        except Exception as err:  # noqa: BLE001 - the exporter raises many kinds; say which model and why
            raise ConfigError(f"--format onnx: torch.onnx could not export {type(self.task.backbone.model).__name__} "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); use --format hf") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = [i.name for i in session.get_inputs()]  # an input the graph does not use is left out

        def run(batch: dict[str, torch.Tensor]) -> list[Any]:
            return session.run(None, {n: batch[n].numpy() for n in wanted})

        differences = self.check("ONNX", run)
        (out / "onnx_io.json").write_text(json.dumps({
            "inputs": {i.name: {"shape": [d if isinstance(d, int) else str(d) for d in i.shape], "type": i.type}
                       for i in session.get_inputs()},
            "outputs": {o.name: {"shape": [d if isinstance(d, int) else str(d) for d in o.shape], "type": o.type}
                        for o in session.get_outputs()},
            **self.preprocessing()}, indent=2))
        self.save_preprocessing(out)
        return {"loads_with": "onnxruntime.InferenceSession(folder/model.onnx)", "inputs": wanted,
                **differences}

    def torchscript(self, out: Path) -> dict[str, Any]:
        import warnings

        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches: the check below decides
            self.task._jit_is_scripting = True  # Lightning's own flag: its trainer properties stay quiet while tracing
            try:
                traced = torch.jit.trace(self.wrapper, self.args(self.batches[0]), check_trace=False, strict=False)
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"--format torchscript: tracing failed ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]}); use --format onnx") from None
            finally:
                self.task._jit_is_scripting = False
            try:
                differences = self.check("TorchScript", lambda b: outputs_of(traced(*self.args(b))))
            except ConfigError:
                raise ConfigError("--format torchscript: the traced model does not generalise to inputs of another shape "
                                  "(tracing records one shape's control flow); use --format onnx") from None
        torch.jit.save(traced, str(path))
        (out / "torchscript_io.json").write_text(json.dumps({"inputs": list(self.names), "outputs": self.output_names(),
                                                              **self.preprocessing()}, indent=2))
        self.save_preprocessing(out)
        return {"loads_with": "torch.jit.load(folder/model.pt)", **differences}

    def preprocessing(self) -> dict[str, Any]:
        """What turns raw inputs into the graph's inputs, and its outputs back into labels or text."""
        info: dict[str, Any] = {"task": self.kind}
        if hasattr(self.task, "label_names") and self.kind != "mlm":
            info["label_names"] = list(self.task.label_names)
        if self.kind == "ctc":
            info["vocab"] = list(self.task.vocab.tokens)
            info["blank_id"] = self.task.vocab.blank_id
        if self.modality == "image":
            info["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.task.backbone.processor.items()}
        if self.modality == "text":
            info["max_length"] = self.max_length
        return info

    def save_preprocessing(self, out: Path) -> None:
        """The tokenizer or feature extractor beside the graph (the image data config is in the io file)."""
        processor = self.task.backbone.processor
        if hasattr(processor, "save_pretrained"):
            processor.save_pretrained(out)


def unsupported(run: Any, fmt: str) -> str | None:
    """Why ``fmt`` cannot hold this run's model (checked before any work), or None."""
    if fmt == "backbone" and not getattr(run.model.backbone, "exportable", False):
        return (f"--format backbone: {type(run.model.backbone).__name__} has no Hugging Face format; export the task "
                "(--format hf, onnx or torchscript)")
    if fmt != "hf":
        return None
    if getattr(run.model.backbone, "modality", "") == "image":
        classifier = run.model.backbone.model.pretrained_cfg.get("classifier") or "head"
        if not isinstance(classifier, str):  # e.g. distilled DeiT: two heads, averaged; tunelab trains one
            return (f"--format hf: {run.model.backbone.model_name} has {len(classifier)} classifier heads in timm "
                    f"({', '.join(classifier)}) and tunelab trains one; use --format onnx or torchscript")
        return None
    model_type = getattr(getattr(run.model.backbone, "model", None), "config", None)
    model_type = getattr(model_type, "model_type", "?")
    if run.kind == "mlm" and model_type not in MLM_HEADS:
        return (f"--format hf: a {model_type} masked LM has no mapping onto a transformers masked-LM head here "
                f"(supported: {', '.join(MLM_HEADS)}); use --format onnx or torchscript")
    if run.kind == "ctc":
        from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES

        if model_type not in MODEL_FOR_CTC_MAPPING_NAMES:
            return f"--format hf: transformers has no CTC model for {model_type}; use --format onnx or torchscript"
    if run.kind == "token_classification":
        from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

        if model_type not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
            return f"--format hf: transformers has no token classifier for {model_type}; use --format onnx or torchscript"
    if run.kind not in ("classification", "joint_classification", "ctc", "mlm", "token_classification"):
        return f"--format hf: no Hugging Face class for a {run.kind} task; use --format onnx"
    return None


def sample_batches(run: Any, size: int = 16) -> list[dict[str, Any]]:
    """Two real batches of the run's data (test split, else validation) with different shapes: ``size`` examples,
    then ``size - 1`` others (their own padding length)."""
    datamodule = run.datamodule()
    role = "test" if datamodule.has_split("test") else "val"
    loader = datamodule.prediction_loader(role)
    dataset, collate = loader.dataset, loader.collate_fn
    n = len(dataset)
    if n < 2:
        raise ConfigError(f"the run's {role} split has {n} example(s); the export check needs at least 2")
    first = list(range(min(size, n - 1)))
    second = list(range(len(first), min(n, len(first) + max(1, size - 1))))
    batches = [dict(collate([dataset[i] for i in first])), dict(collate([dataset[i] for i in second]))]
    a, b = (batch.get("input_ids") for batch in batches)
    if a is not None and b is not None and a.shape[1] == b.shape[1] and b.shape[1] > 4:
        # texts truncated to max_length all have its length: check another sequence length too
        keep = b.shape[1] // 2
        batches[1] = {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[1] == b.shape[1] else v
                      for k, v in batches[1].items()}
    return batches


def export_run(run: Any, formats: Sequence[str], out: Path, skip_failures: bool = False) -> dict[str, Any]:
    """Export ``run`` in each of ``formats`` into ``out/<format>/``; writes and returns ``out/export_report.json``
    (rewritten after each format). ``skip_failures`` (``--format all``): a format the model cannot take, or whose
    check fails, is left out with its reason in the report instead of stopping the others."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--format {unknown[0]!r} is unknown; choose from {', '.join(FORMATS)} (or all: {', '.join(TASK_FORMATS)})")
    problems = {fmt: unsupported(run, fmt) for fmt in formats}
    if not skip_failures and any(problems.values()):
        raise ConfigError(next(p for p in problems.values() if p))
    report: dict[str, Any] = {"run": str(run.run_dir), "checkpoint": str(run.checkpoint), "weights": run.weights,
                              "task": run.kind, "formats": {}}
    path = out / "export_report.json"
    if path.is_file():  # an earlier export of other formats into the same folder stays listed
        earlier = json.loads(path.read_text())
        if earlier.get("checkpoint") == report["checkpoint"] and earlier.get("weights") == report["weights"]:
            report["formats"] = dict(earlier.get("formats", {}))
    from modules.lora import has_lora, merge_lora

    exporter = Exporter(run, sample_batches(run))  # the reference outputs: the model as trained, adapters unmerged
    report["tolerance"] = {"relative_to_output_scale": exporter.tolerance}
    if has_lora(run.model.backbone):  # the adapters folded into the base weights: every format exports a plain model
        merge_lora(run.model.backbone)
        report["lora"] = "adapters merged into the base weights (checked against the unmerged model)"
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        folder = out / fmt
        shutil.rmtree(folder, ignore_errors=True)  # never a mix of an old and a new export
        try:
            if problems[fmt]:
                raise ConfigError(problems[fmt])
            report["formats"][fmt] = {"folder": str(folder), **getattr(exporter, fmt)(folder)}
            log.info(f"exported {fmt}: {folder}")
        except ConfigError as err:
            shutil.rmtree(folder, ignore_errors=True)
            if not skip_failures:
                raise
            report["formats"][fmt] = {"skipped": str(err)}
            log.warning(f"skipped {fmt}: {err}")
        path.write_text(json.dumps(report, indent=2))
    return report


def export_backbone(run_dir: str | Path, state: dict[str, torch.Tensor], out: str | Path) -> Path:
    """The ``backbone.*`` weights of a task state dict, in the Hugging Face format: the run's backbone architecture
    rebuilt from its folder (no download), given these weights, saved by ``save_backbone``."""
    from modules.backbones import save_backbone

    backbone = rebuild_backbone(run_dir)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    return save_backbone(backbone, out)
