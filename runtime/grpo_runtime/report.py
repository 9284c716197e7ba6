"""`grpo report URI`: reward curves from a run's metrics (metrics/part-N.jsonl), training and held-out
evaluation, as a PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def read_metrics(uri: str, endpoint: str | None = None, region: str | None = None) -> list[dict[str, Any]]:
    from grpo_runtime import metrics_log
    from grpo_runtime.storage import open_storage

    return metrics_log.read_metrics(open_storage(uri, endpoint=endpoint, region=region))


def split_lines(metrics: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training step lines, eval lines): eval lines carry only `step` and eval/... keys."""
    evals = [m for m in metrics if any(key.startswith("eval/") for key in m)]
    return [m for m in metrics if "reward" in m], evals


def reward_figure(metrics: list[dict[str, Any]]):
    """Total reward, then one panel per reward function: its training mean per step and, where the
    job evaluates, its held-out mean and accuracy at each evaluation (and eval/accuracy, the headline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = split_lines(metrics)
    names = sorted(
        {key.split("/")[1] for m in train for key in m if key.startswith("rewards/") and key.endswith("/mean")}
        | {key.split("/")[1] for m in evals for key in m if key.count("/") == 2}
    )
    columns = min(3, 1 + len(names))
    rows = -(-(1 + len(names)) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    axes = axes.ravel()
    steps = [m["step"] for m in train]
    eval_steps = [m["step"] for m in evals]
    axes[0].plot(steps, [m["reward"] for m in train], marker="o", label="train reward (weighted sum)")
    axes[0].fill_between(
        steps, [m["reward"] - m["reward_std"] for m in train], [m["reward"] + m["reward_std"] for m in train], alpha=0.2
    )
    if evals:
        axes[0].plot(eval_steps, [m["eval/accuracy"] for m in evals], marker="s", color="black", label="eval accuracy")
    axes[0].set_title("total reward" + (" and held-out accuracy" if evals else ""))
    for ax, name in zip(axes[1:], names, strict=False):
        ax.plot(steps, [m.get(f"rewards/{name}/mean") for m in train], marker=".", label="train mean")
        if evals:
            ax.plot(eval_steps, [m.get(f"eval/{name}/mean") for m in evals], marker="s", label="eval mean")
            ax.plot(eval_steps, [m.get(f"eval/{name}/accuracy") for m in evals], marker="^", linestyle="--",
                    label="eval accuracy")
        ax.set_title(f"reward {name}")
    for ax in axes[1 + len(names):]:
        ax.set_visible(False)
    for ax in axes[: 1 + len(names)]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_rewards(metrics: list[dict[str, Any]], out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig = reward_figure(metrics)
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
    train, evals = split_lines(metrics)
    if not train and not evals:
        print(f"grpo report: {uri} has no metrics yet (no step has finished)", file=sys.stderr)
        return 2
    path = plot_rewards(metrics, out)
    line = f"{path}: {len(train)} steps"
    if train:
        line += f", reward {train[0]['reward']:.3f} -> {train[-1]['reward']:.3f}"
    if evals:
        line += (
            f", eval accuracy {evals[0]['eval/accuracy']:.3f} (step {evals[0]['step']}) -> "
            f"{evals[-1]['eval/accuracy']:.3f} (step {evals[-1]['step']})"
        )
    print(line)
    return 0
