"""Fine-tuning curves: training loss and evaluation accuracy per epoch.

Example:
    >>> import os, tempfile
    >>> h = {"epochs": [1, 2, 3], "train_loss": [1.0, 0.7, 0.6], "eval_accuracy": [0.5, 0.6, None]}
    >>> history_rows(h)
    [(1, 1.0, 0.5), (2, 0.7, 0.6), (3, 0.6, None)]
    >>> draw_history(h, os.path.join(tempfile.mkdtemp(), "ft.png")).suffix
    '.png'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import FONT, pyplot, save_figure
from oba_fx.errors import BadInputError


def history_rows(history: Any) -> list[tuple[int, float, float | None]]:
    """``(epoch, train loss, eval accuracy)`` from a :class:`oba_fx.FinetuneResult` or a dict with
    ``epochs``, ``train_loss`` and ``eval_accuracy``."""
    get = history.get if isinstance(history, dict) else lambda k: getattr(history, k)
    epochs, loss, acc = list(get("epochs")), list(get("train_loss")), list(get("eval_accuracy") or [])
    acc += [None] * (len(epochs) - len(acc))
    if len(loss) != len(epochs):
        raise BadInputError(f"history: {len(epochs)} epochs but {len(loss)} losses")
    return list(zip(epochs, loss, acc))


def draw_history(history: Any, path: str | Path, title: str = "fine-tuning") -> Path:
    """Loss (left axis) and accuracy (right axis) per epoch; returns the path written."""
    plt = pyplot()
    rows = history_rows(history)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", color="#1f77b4", label="train loss")
    ax.set_xlabel("epoch", fontsize=FONT + 1)
    ax.set_ylabel("train loss", color="#1f77b4", fontsize=FONT + 1)
    acc = [(r[0], 100 * r[2]) for r in rows if r[2] is not None]
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "s-", color="#d62728")
        ax2.set_ylabel("eval accuracy (%)", color="#d62728", fontsize=FONT + 1)
    ax.set_title(title, fontsize=FONT + 3)
    fig.tight_layout()
    return save_figure(fig, path)
