"""In a fresh process, load each export of a run the way a user of that format would (transformers' Auto classes,
timm, onnxruntime, torch.jit) and run it on the run's evaluation batches; print every example's outputs as JSON.

    python tests/exported_outputs.py RUN EXPORT_DIR SPLIT OUT.json

tunelab is used only to rebuild the batches (the same ones eval.py saw) and, for text and images, the raw inputs
that the exported tokenizer / pretrained_cfg transform must turn into the same tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(run_dir: str, export_dir: str, split: str, out: str) -> None:
    from run.trained import load_run

    run = load_run(run_dir)
    datamodule = run.datamodule()
    loader = datamodule.prediction_loader(split)
    order = [key[1] if isinstance(key, tuple) else int(key) for batch in loader.batch_sampler for key in batch]
    batches = list(loader)
    kind, modality = run.kind, run.model.backbone.modality
    del run  # from here on only the exported artifacts compute
    root = Path(export_dir)
    results: dict[str, dict] = {}
    checks: dict[str, bool] = {}

    def per_example(outputs: list[np.ndarray], batch: dict) -> list:
        if kind == "mlm":  # mean NLL of each block's masked tokens
            rows = []
            for logits, labels in zip(outputs[0], batch["labels"].numpy(), strict=True):
                where = labels != -100
                z = logits[where].astype(np.float64)
                log_z = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
                rows.append(float(np.mean(log_z - z[np.arange(len(z)), labels[where]])) if where.any() else None)
            return rows
        if kind == "ctc":
            return [lp[:n].tolist() for lp, n in zip(outputs[0], outputs[1], strict=True)]
        return outputs[0].tolist()

    def run_format(name: str, forward) -> None:
        rows: list = []
        with torch.inference_mode():
            for batch in batches:
                rows += per_example([np.asarray(o) for o in forward(batch)], batch)
        results[name] = {str(i): row for i, row in zip(order, rows, strict=True)}

    hf = root / "hf"
    if hf.is_dir() and modality == "image":
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(f"local-dir:{hf}", pretrained=True).eval()
        run_format("hf", lambda b: [model(b["pixel_values"]).numpy()])
        transform = create_transform(**resolve_data_config({}, model=model))  # what a timm user does
        from datamodules.image_sources import open_image

        dataset = datamodule.prediction_loader(split).dataset
        checks["transform_matches"] = all(  # the pretrained_cfg's transform makes the pixels the model saw
            torch.allclose(transform(open_image(dataset.split.images[i], "x")), dataset[i]["pixel_values"], atol=1e-6)
            for i in range(min(8, len(dataset))))
        checks["label_names_match"] = model.pretrained_cfg.get("label_names") == list(datamodule.data_spec().label_names)
    elif hf.is_dir() and kind == "ctc":
        from transformers import AutoModelForCTC, AutoProcessor

        model = AutoModelForCTC.from_pretrained(hf).eval()
        processor = AutoProcessor.from_pretrained(hf)
        use_mask = processor.feature_extractor.return_attention_mask

        def ctc(batch: dict) -> list:
            logits = model(batch["input_values"], attention_mask=batch["attention_mask"] if use_mask else None).logits
            frames = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))
            return [torch.log_softmax(logits.float(), -1).numpy(), frames.numpy()]

        run_format("hf", ctc)
        five, six = processor.tokenizer.convert_ids_to_tokens([5, 6])  # CTC decoding: repeats merged, blanks out, | a space
        checks["decode_matches"] = processor.batch_decode(np.array([[0, 5, 5, 0, 2, 6]]))[0] == f"{five} {six}"
    elif hf.is_dir():
        from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

        if kind == "mlm":
            model = AutoModelForMaskedLM.from_pretrained(hf).eval()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(hf, trust_remote_code=True).eval()
            checks["id2label_match"] = [model.config.id2label[i] for i in range(model.config.num_labels)] == \
                list(datamodule.data_spec().label_names)
        run_format("hf", lambda b: [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.numpy()])
        tokenizer = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
        dataset = datamodule.prediction_loader(split).dataset
        if hasattr(dataset, "texts"):  # the exported tokenizer turns the raw texts into the ids the model saw
            # no max_length given: the saved tokenizer must truncate where the run did, as pipeline() relies on
            checks["tokenizer_matches"] = all(tokenizer(dataset.texts[i], truncation=True)["input_ids"]
                                              == list(dataset.input_ids[i]) for i in range(min(8, len(dataset))))
    if (root / "onnx").is_dir():
        import onnxruntime

        session = onnxruntime.InferenceSession(str(root / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        run_format("onnx", lambda b: session.run(None, {n: b[n].numpy() for n in names}))
    if (root / "torchscript").is_dir():
        traced = torch.jit.load(str(root / "torchscript" / "model.pt"))
        inputs = json.loads((root / "torchscript" / "torchscript_io.json").read_text())["inputs"]

        def scripted(batch: dict) -> list:
            out = traced(*[batch[n] for n in inputs])
            return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

        run_format("torchscript", scripted)
    Path(out).write_text(json.dumps({"outputs": results, "checks": checks}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(*sys.argv[1:])
