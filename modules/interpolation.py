"""Weight-space interpolation between pretrained and fine-tuned weights (WiSE-FT, Wortsman et al. 2022).

θ(α) = θ_pre + α·(θ_ft − θ_pre): α=0 is the pretrained backbone, α=1 the fine-tuned one.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from modules.errors import ConfigError

DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def check_same_architecture(pre: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor], what: str = "weights") -> None:
    """Raise ``ConfigError`` naming the first tensor that differs in name or shape."""
    for name in list(pre) + [n for n in ft if n not in pre]:
        if name not in ft:
            raise ConfigError(f"cannot interpolate {what}: tensor {name!r} is in the pretrained weights but not the fine-tuned ones; the architectures differ")
        if name not in pre:
            raise ConfigError(f"cannot interpolate {what}: tensor {name!r} is in the fine-tuned weights but not the pretrained ones; the architectures differ")
        if pre[name].shape != ft[name].shape:
            raise ConfigError(
                f"cannot interpolate {what}: tensor {name!r} has shape {tuple(pre[name].shape)} pretrained but "
                f"{tuple(ft[name].shape)} fine-tuned; the architectures differ"
            )


def interpolate_states(pre: Mapping[str, torch.Tensor], ft: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ_pre + α·(θ_ft − θ_pre) for every floating tensor; integer buffers are taken from ``ft``.

    ``torch.lerp`` is exact at both ends: α=0 gives ``pre`` and α=1 gives ``ft`` bit for bit.
    """
    check_same_architecture(pre, ft)
    out = {}
    for name, p in pre.items():
        f = ft[name]
        if torch.is_floating_point(f):
            out[name] = torch.lerp(p.to(f.device, f.dtype), f, float(alpha))
        else:
            out[name] = f.clone()
    return out


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def backbone_state(task_state: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The backbone's tensors out of a whole task's state dict (keys without ``prefix``)."""
    return {k[len(prefix) :]: v for k, v in task_state.items() if k.startswith(prefix)}


def sweep(
    task: torch.nn.Module,
    pre: Mapping[str, torch.Tensor],
    ft: Mapping[str, torch.Tensor],
    alphas: Iterable[float],
    validate: Callable[[], Mapping[str, float]],
    metric: str,
) -> list[dict[str, float]]:
    """Validate ``task`` with its backbone at each α (head as it is: fine-tuned); restores θ_ft after.

    ``validate()`` runs one validation and returns its metrics (the run's own trainer does it, so
    under DDP every process validates its shard and the metrics are reduced across them).
    Returns one row per α: ``{"alpha": α, <metric>: value, ...other val metrics}``.
    """
    check_same_architecture(pre, ft, "the backbone")
    rows = []
    try:
        for alpha in alphas:
            task.backbone.load_state_dict(interpolate_states(pre, ft, alpha))
            results = validate()
            if metric not in results:
                raise ConfigError(f"wise_ft metric {metric!r} is not logged in validation; logged: {', '.join(results)}")
            rows.append({"alpha": float(alpha), **{k: float(v) for k, v in results.items()}})
    finally:
        task.backbone.load_state_dict(dict(ft))
    return rows


def best_row(rows: Sequence[dict[str, float]], metric: str, mode: str = "max") -> dict[str, float]:
    """The row with the best ``metric``; ties go to the larger α (closer to the fine-tuned model)."""
    sign = 1.0 if mode == "max" else -1.0
    return max(rows, key=lambda r: (sign * r[metric], r["alpha"]))


def write_sweep(rows: Sequence[dict[str, float]], folder: Path, metric: str, mode: str) -> dict[str, float]:
    """``wise_ft.csv``, ``wise_ft.md``, ``wise_ft.png`` and ``best.json`` in ``folder``; returns the best row."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["alpha", metric, *sorted({k for r in rows for k in r} - {"alpha", metric})]
    with open(folder / "wise_ft.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    best = best_row(rows, metric, mode)
    lines = [f"| alpha | {metric} |", "|---|---|"]
    lines += [f"| {r['alpha']:.2f} | {r[metric]:.4f}{' (best)' if r is best else ''} |" for r in rows]
    (folder / "wise_ft.md").write_text("\n".join(lines) + "\n")
    (folder / "best.json").write_text(json.dumps({"alpha": best["alpha"], metric: best[metric], "mode": mode}, indent=2))
    plot_sweep(rows, folder / "wise_ft.png", metric, best)
    return best


def plot_sweep(rows: Sequence[dict[str, float]], path: Path, metric: str, best: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["alpha"] for r in rows], [r[metric] for r in rows], marker="o")
    ax.scatter([best["alpha"]], [best[metric]], s=120, facecolors="none", edgecolors="tab:red", label=f"best α={best['alpha']:.2f}")
    ax.set_xlabel("α  (0 = pretrained backbone, 1 = fine-tuned)")
    ax.set_ylabel(metric)
    ax.set_title("WiSE-FT: θ_pre + α·(θ_ft − θ_pre), head fine-tuned")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
