"""Keep secrets out of what a run writes: the saved config, logger hyperparameters and Hydra's multirun.yaml."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# whole key names only: `api_key`, `wandb_api_key`, `hf_token`, `access_token`, `password`, `secret`...
# but never `tokenizer`, `train_tokenizer`, `max_tokens` or `pad_token` (real settings a run needs)
SECRET_KEY = re.compile(r"^(?:.*_)?(?:api_?key|secret(?:_key)?|password|passwd|credentials?)$"
                        r"|^(?:hf_|auth_|access_|api_|bearer_)?token$", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret(key: Any) -> bool:
    return bool(SECRET_KEY.match(str(key).rsplit(".", 1)[-1].lstrip("+~")))


def redact(config: Any) -> Any:
    """A plain copy of ``config`` with values of secret-looking keys (and ``key=value`` overrides) replaced."""
    if isinstance(config, Mapping):
        return {k: REDACTED if is_secret(k) else redact(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    if isinstance(config, str) and "=" in config and is_secret(config.split("=", 1)[0]):
        return f"{config.split('=', 1)[0]}={REDACTED}"
    return config


class RedactSecrets(Callback):
    """Hydra writes ``multirun.yaml`` (the config and the command-line overrides) before the first job;
    rewrite it with secrets redacted as soon as that job starts."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        path = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
        if path.is_file():
            saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            OmegaConf.save(OmegaConf.create(redact(saved)), path)
