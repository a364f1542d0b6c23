"""Shared test helpers: compose the real configs, run train() in-process, tiny fast overrides."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when it is imported (lightning imports it, below) and when it defines a
# kernel: without a GPU, the kernel tests (tests/test_kernels.py) run Triton's CPU interpreter. It changes
# nothing else on CPU (only Triton-generated code reads it; inductor generates C++ for CPU tensors).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from omegaconf import DictConfig

import train as train_script  # noqa: E402
from run.config import CONFIG_DIR, job_config  # noqa: E402, F401 - CONFIG_DIR: for the tests

ROOT = Path(__file__).resolve().parents[1]

# never reach for the network in tests: hub names must fail fast and clearly
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# a small, quick slice of the default task (BBC News + MiniLM)
FAST_TEXT = (
    "data.max_train_samples=160",
    "data.max_eval_samples=40",
    "data.max_length=48",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenization cache for the whole session (tests share tokenized BBC subsets)."""
    return tmp_path_factory.mktemp("cache")


def compose_config(output_dir: Path, overrides: Sequence[str] = (), cache: Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would run, writing into ``output_dir``."""
    return job_config(overrides, output_dir, cache)


def run_train(output_dir: Path, overrides: Sequence[str] = (), cache: Path | None = None) -> dict[str, float]:
    """Compose and run ``train.train`` in-process; returns its metrics."""
    return train_script.train(compose_config(output_dir, overrides, cache))

# a tiny BERT from scratch on a BBC slice: for tests of mechanics (freezing, LRs, DDP, resume)
TINY_SCRATCH = (
    "backbone=bert_scratch",
    "backbone.config_overrides.hidden_size=32",
    "backbone.config_overrides.num_hidden_layers=3",
    "backbone.config_overrides.num_attention_heads=2",
    "backbone.config_overrides.intermediate_size=64",
    "data.max_length=32",
    "data.max_train_samples=96",
    "data.max_eval_samples=32",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "+callbacks.probe._target_=tests.probes.TrainingProbe",
)
