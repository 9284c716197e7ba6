"""`grpo report URI`: reward curves from a run's metrics (metrics/part-N.jsonl), as a PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def read_metrics(uri: str, endpoint: str | None = None, region: str | None = None) -> list[dict[str, Any]]:
    from grpo_runtime import metrics_log
    from grpo_runtime.storage import open_storage

    return metrics_log.read_metrics(open_storage(uri, endpoint=endpoint, region=region))


def plot_rewards(metrics: list[dict[str, Any]], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    names = sorted({key.split("/")[1] for m in metrics for key in m if key.startswith("rewards/") and key.endswith("/mean")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, [m["reward"] for m in metrics], marker="o", label="reward (weighted sum)")
    axes[0].fill_between(
        steps,
        [m["reward"] - m["reward_std"] for m in metrics],
        [m["reward"] + m["reward_std"] for m in metrics],
        alpha=0.2,
    )
    axes[0].set_title("total reward")
    for name in names:
        axes[1].plot(steps, [m.get(f"rewards/{name}/mean") for m in metrics], marker=".", label=name)
    axes[1].set_title("reward per function (mean)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(uri: str, out: str) -> int:
    from grpo_runtime.storage import StorageError

    try:
        metrics = read_metrics(uri)
    except StorageError as exc:
        print(f"grpo report: {exc}", file=sys.stderr)
        return 2
    if not metrics:
        print(f"grpo report: {uri} has no metrics yet (no step has finished)", file=sys.stderr)
        return 2
    path = plot_rewards(metrics, out)
    first, last = metrics[0], metrics[-1]
    print(f"{path}: {len(metrics)} steps, reward {first['reward']:.3f} -> {last['reward']:.3f}")
    return 0
