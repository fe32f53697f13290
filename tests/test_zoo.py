"""Every torchvision classification model prunes, shrinks and computes the masked original.

Each model is built with random weights (``torch.manual_seed(0)``), BatchNorm statistics and
ConvNeXt layer scales randomised (``_oracle.randomize``: fresh models have identity BNs, which
would hide a missing mask), put in eval mode, and pruned with ``criterion="l1",
channel_ratio=0.3`` at the smallest input size it accepts. Then, for each model:

* the slimmed GraphModule runs and gives the original's output shape;
* the report has strictly fewer FLOPs and parameters after than before;
* its output equals the ORIGINAL eager model masked from the report alone
  (``_oracle.masked_original``, no FX involved) to 1e-4 relative, and the masking changed that
  output (so the comparison is not vacuous);
* every slimmed parameter is the original one at the reported kept indices.

A fast subset runs by default (tiny inputs); the whole list runs with ``-m zoo``::

    python -m pytest tests/test_zoo.py -m zoo -q

Set ``OBA_ZOO_RESULTS=/path/file.jsonl`` to append one JSON line per model (FLOPs and params
ratios, barriers, errors, seconds); ``OBA_TEST_THREADS`` sets torch's thread count (default 1:
on a shared 2-core machine one thread is several times faster than two).
"""

from __future__ import annotations

import gc
import json
import os
import time

import pytest
import torch
import torchvision

from _oracle import check_params_sliced, masked_and_slimmed, one_thread, randomize  # noqa: F401 (fixture)

TOL = 1e-4
ALL_MODELS = sorted(torchvision.models.list_models(module=torchvision.models))

#: the default run: one model per architectural family that stresses a different coupling rule
#: (residual adds, SE gates + hardswish, channel shuffle + split, fire-module cat, grouped convs,
#: dense cat, inception cat, channels-last LayerNorm + layer scale)
FAST = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf",
        "efficientnet_b0", "densenet121", "googlenet", "convnext_tiny"]


def input_size(name: str) -> int:
    """The smallest square input each model accepts (all downsample by 32 except where noted)."""
    if name.startswith("vit_"):
        return 224  # fixed image_size (positional embedding)
    if name == "maxvit_t":
        return 224  # 7x7 partitions at every stage: 224 / 32 = 7
    if name == "inception_v3":
        return 75  # the architecture's minimum
    if name.startswith(("alexnet", "squeezenet")):
        return 64  # alexnet needs >= 63; squeezenet keeps a 3x3 map before its classifier
    return 32


def _record(row: dict) -> None:
    path = os.environ.get("OBA_ZOO_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def check_model(name: str) -> None:
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None)).eval()
    s = input_size(name)
    x = torch.randn(1 if s >= 224 else 2, 3, s, s)
    t0 = time.time()
    row = {"model": name, "size": s}
    try:
        r = masked_and_slimmed(model, x, criterion="l1", channel_ratio=0.3)
    except Exception as e:
        _record({**row, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "seconds": time.time() - t0})
        raise
    rep = r["report"]
    row.update(ok=True, seconds=round(time.time() - t0, 1),
               flops_ratio=rep["flops_after"] / rep["flops_before"],
               params_ratio=rep["params_after"] / rep["params_before"],
               units=f"{rep['units_removed']}/{rep['units_prunable']}", barriers=len(rep["barriers"]),
               barrier_ops=sorted({b["target"] for b in rep["barriers"]}), err=r["err"], effect=r["effect"])
    try:
        assert tuple(r["slim"].shape) == tuple(r["orig"].shape)
        assert rep["flops_after"] < rep["flops_before"], rep
        assert rep["params_after"] < rep["params_before"]
        assert r["err"] <= TOL, f"{name}: slimmed differs from the masked eager original by {r['err']:.3g}"
        assert rep["max_rel_error"] <= TOL
        assert r["effect"] > 10 * TOL, f"{name}: masking changed the output by only {r['effect']:.3g}: vacuous"
        check_params_sliced(model, r["compiled"], rep["kept"])
    except AssertionError as e:
        row.update(ok=False, error=str(e)[:2000])
        raise
    finally:
        _record(row)
        del r
        gc.collect()


@pytest.mark.parametrize("name", FAST)
def test_fast_subset_prunes_to_masked_original(name):
    check_model(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL_MODELS)
def test_zoo_prunes_to_masked_original(name):
    check_model(name)


def test_fast_subset_is_in_the_zoo():
    assert set(FAST) <= set(ALL_MODELS)
