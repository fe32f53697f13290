"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """CPU model, thread counts, versions and load average, stored with every result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": load}


def compare(mean_a: float, spread_a: float, mean_b: float, spread_b: float) -> str:
    """``"beats"`` / ``"loses"`` when A's mean differs from B's by more than the sum of the two
    half-spreads (spread = max − min over seeds), else ``"within spread"``: the one rule every
    benchmark uses for "A beats B beyond the spread".

    Example:
        >>> compare(0.92, 0.01, 0.90, 0.02), compare(0.92, 0.02, 0.90, 0.03), compare(0.85, 0.0, 0.90, 0.0)
        ('beats', 'within spread', 'loses')
    """
    noise = (spread_a + spread_b) / 2
    diff = mean_a - mean_b
    return "beats" if diff > noise else "loses" if -diff > noise else "within spread"


# The settings of a `finetuned.py` result that change what its rows measure: rows run under different
# values do not belong in one table (`finetuned.py --resume`, `seed_spread.py`).
PROTOCOL = {"model": None, "seed": 0, "calib": 512, "epochs": 1, "train_limit": None, "jpeg": None, "lr": 1e-3,
            "schedule": "step"}


def protocol(settings: dict) -> dict:
    """The settings of ``PROTOCOL`` (older results lack ``lr`` and ``schedule``: their defaults)."""
    return {k: settings.get(k, default) for k, default in PROTOCOL.items()}


def recipe(settings: dict) -> str:
    """The fine-tuning recipe when it is not the CLI's (SGD at 1e-3, multi-step schedule)."""
    lr, schedule = settings.get("lr", 1e-3), settings.get("schedule", "step")
    if schedule == "step" and lr == 1e-3:
        return ""
    return f" (SGD lr {lr:g}, {'decayed to 0 by a per-step cosine' if schedule == 'cosine' else 'multi-step'})"
