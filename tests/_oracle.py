"""An independent oracle for slimming: the ORIGINAL eager model, masked from the report alone.

``oba_fx.prune_graph`` verifies its result internally against ``oba_fx.masking.masked_reference``,
which is built from the same FX graph, the same coupling and the same selection as the slimmed
network. A bug in tracing, in the coupling or in the reference itself would be shared by both
sides of that check. This oracle shares none of it:

* it starts from a deep copy of the user's **eager** ``nn.Module`` (no tracing, no FX);
* it reads only the public report ``compiled.meta["oba"]["kept"]`` ({param name: {dim: kept
  indices}});
* it masks in two independent ways, both derived from ``kept``:

  1. **producers**: a forward hook on every module whose own output channels lost entries
     (conv / linear rows, transposed-conv columns, BatchNorm / GroupNorm / InstanceNorm / PReLU
     entries, embedding columns) multiplies that module's output by a 0/1 channel mask. This
     is what makes a removed channel zero *after* its BatchNorm shift and bias, as the design
     requires (``docs/design.md`` "The pipeline and its records");
  2. **consumers**: the input columns that a layer lost (``kept[w][1]`` of a conv with
     ``groups == 1`` or of a linear, ``kept[w][0]`` of a transposed conv) are set to zero in its
     weight, so a removed channel contributes nothing even if some op without parameters on
     the way (a sigmoid, a constant shift) made it non-zero again.

  Together these give "the original network with every removed channel zeroed at every
  consumer", computed by eager PyTorch.

* :func:`check_params_sliced` checks that every parameter and BatchNorm buffer of the slimmed
  network is exactly the original tensor indexed by ``kept`` (the report is truthful, and no
  parameter changed that the report does not list).

The choice against re-running ``analyze_model`` / ``SelectPass`` / ``masked_reference`` / ``slim``
by hand: that would reuse exactly the code under test and could only catch non-determinism.

A parameter listed in ``kept`` whose module is of an unknown kind raises ``NotImplementedError``
(``strict=True``) so that a test never silently checks less than it claims.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
import torch.nn as nn

import oba_fx

_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else tuple(x) if isinstance(x, list) else (x,)


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat(v)]
    return []


def rel_err(got: Any, want: Any) -> float:
    """Largest absolute difference relative to the largest magnitude of ``want`` (same metric as
    the library, computed here in float64)."""
    a, b = _flat(got), _flat(want)
    assert len(a) == len(b), f"output structure differs: {len(a)} vs {len(b)} tensors"
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"output shape {tuple(x.shape)} != {tuple(y.shape)}"
        if y.numel() == 0:
            continue
        scale = float(y.double().abs().max())
        err = float((x.double() - y.double()).abs().max())
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def _mask(n: int, kept: list[int], dtype: torch.dtype) -> torch.Tensor:
    m = torch.zeros(n, dtype=dtype)
    m[torch.as_tensor(kept, dtype=torch.long)] = 1
    return m


def _out_channels(module: nn.Module, attr: str, kept_dims: dict[int, list[int]]) -> tuple[int, list[int]] | None:
    """(output dim of the module's value, kept indices) if ``module.attr`` says its outputs shrank.

    Output dim ``-1`` means the last dimension (linear, embedding)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if attr == "weight" and 1 in kept_dims:  # weight (in, out/g, k..): groups == 1 here
            return 1, kept_dims[1]
        if attr == "bias" and 0 in kept_dims:
            return 1, kept_dims[0]
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return (1, kept_dims[0]) if 0 in kept_dims else None
    if isinstance(module, nn.Linear):
        return (-1, kept_dims[0]) if 0 in kept_dims else None
    if isinstance(module, _CHANNEL_NORMS) or isinstance(module, nn.PReLU):
        return (1, kept_dims[0]) if 0 in kept_dims else None
    if isinstance(module, nn.Embedding):
        return (-1, kept_dims[1]) if 1 in kept_dims else None
    raise NotImplementedError(f"oracle: no masking rule for {type(module).__name__}.{attr}")


def _in_columns(module: nn.Module, attr: str, kept_dims: dict[int, list[int]]) -> tuple[int, list[int]] | None:
    """(weight dim, kept indices) of the input columns a layer lost."""
    if attr != "weight":
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (0, kept_dims[0]) if 0 in kept_dims and module.groups == 1 else None
    if isinstance(module, nn.modules.conv._ConvNd):
        return (1, kept_dims[1]) if 1 in kept_dims and module.groups == 1 else None
    if isinstance(module, nn.Linear):
        return (1, kept_dims[1]) if 1 in kept_dims else None
    return None


def masked_original(model: nn.Module, kept: dict[str, dict[int, list[int]]], *, strict: bool = True) -> nn.Module:
    """A deep copy of the eager ``model`` with every removed channel of ``kept`` masked (module doc)."""
    m = copy.deepcopy(model).eval()
    modules = dict(m.named_modules())
    out_masks: dict[str, tuple[int, torch.Tensor]] = {}
    for name, dims in kept.items():
        mod_name, _, attr = name.rpartition(".")
        module = modules.get(mod_name)
        if module is None:
            raise KeyError(f"oracle: report names parameter {name!r} but the model has no module {mod_name!r}")
        p = getattr(module, attr)
        dims = {int(d): list(v) for d, v in dims.items()}
        try:
            oc = _out_channels(module, attr, dims)
        except NotImplementedError:
            if strict:
                raise
            oc = None
        if oc is not None:
            od, k = oc
            wide = attr == "weight" and isinstance(module, (nn.modules.conv._ConvTransposeNd, nn.Embedding))
            n = p.shape[1] if wide else p.shape[0]
            mask = _mask(n, k, p.dtype)
            prev = out_masks.get(mod_name)
            if prev is not None:
                assert prev[0] == od and torch.equal(prev[1], mask), \
                    f"oracle: report gives {mod_name} inconsistent output channels ({name})"
            out_masks[mod_name] = (od, mask)
        ic = _in_columns(module, attr, dims)
        if ic is not None:
            d, k = ic
            view = [1] * p.dim()
            view[d] = p.shape[d]
            with torch.no_grad():
                p.mul_(_mask(p.shape[d], k, p.dtype).view(view))

    def hook_for(od: int, mask: torch.Tensor):
        def hook(_mod, _inp, out):
            view = [1] * out.dim()
            view[od] = mask.numel()
            return out * mask.to(out.dtype).view(view)
        return hook

    for mod_name, (od, mask) in out_masks.items():
        modules[mod_name].register_forward_hook(hook_for(od, mask))
    return m


def check_params_sliced(original: nn.Module, compiled: torch.nn.Module, kept: dict[str, dict[int, list[int]]]) -> None:
    """Every parameter of ``compiled`` equals the original one indexed by ``kept`` (bit for bit),
    BatchNorm running statistics follow their weight's kept channels, and every name in
    ``kept`` exists in ``compiled``."""
    orig = dict(original.named_parameters())
    got = dict(compiled.named_parameters())
    missing = sorted(set(kept) - set(got))
    assert not missing, f"report lists parameters absent from the slimmed net: {missing[:5]}"
    for name, p in got.items():
        assert name in orig, f"slimmed net has a parameter {name!r} that the original lacks"
        want = orig[name].detach()
        for d, k in sorted((kept.get(name) or {}).items()):
            want = want.index_select(int(d), torch.as_tensor(k, dtype=torch.long))
        assert tuple(p.shape) == tuple(want.shape), f"{name}: shape {tuple(p.shape)}, report says {tuple(want.shape)}"
        assert torch.equal(p.detach(), want), f"{name}: values are not the original ones at the kept indices"
    omods = dict(original.named_modules())
    for mname, mod in compiled.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None and mname in omods:
            om = omods[mname]
            k = (kept.get(f"{mname}.weight") or {}).get(0)
            for attr in ("running_mean", "running_var"):
                want = getattr(om, attr)
                if k is not None:
                    want = want[torch.as_tensor(k, dtype=torch.long)]
                assert torch.equal(getattr(mod, attr), want), f"{mname}.{attr} not sliced like {mname}.weight"


def masked_and_slimmed(model: nn.Module, x: Any, **prune_kwargs) -> dict[str, Any]:
    """Prune ``model`` and evaluate, on ``x``: the slimmed net, the report-masked eager original
    (:func:`masked_original`) and the unmasked original.

    Returns a dict with ``compiled``, ``report``, ``masked`` (the masked eager model), ``slim``,
    ``ref``, ``orig`` (outputs), ``err`` (``rel_err(slim, ref)``) and ``effect``
    (``rel_err(ref, orig)``: how much the masking changed the output, so that a test can make
    sure the comparison was not vacuous).
    """
    inputs = _as_tuple(x)
    compiled = oba_fx.prune_graph(model, x, **prune_kwargs)
    report = compiled.meta["oba"]
    masked = masked_original(model, report["kept"])
    with torch.no_grad():
        y_slim = compiled(*inputs)
        y_ref = masked(*inputs)
        y_orig = model(*inputs)
    return {"compiled": compiled, "report": report, "masked": masked, "slim": y_slim, "ref": y_ref,
            "orig": y_orig, "err": rel_err(y_slim, y_ref), "effect": rel_err(y_ref, y_orig)}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make a freshly initialised model a demanding test subject, in place.

    * every BatchNorm gets random affine parameters and running statistics, every GroupNorm
      random affine parameters: fresh torchvision BNs (weight 1, bias 0, mean 0, var 1) are the
      identity in eval mode, so a removed channel would stay zero after them whether or not the
      mask is applied after the BN; a non-zero shift is the case the masked reference exists for;
    * every ``layer_scale`` (ConvNeXt, 1e-6 at init) gets values near 1, otherwise every block's
      contribution, and so every pruned channel, vanishes below the comparison tolerance;
    * every conv / linear whose weight is all zero (ViT's head) gets random weights, otherwise the
      output would not depend on anything that was pruned.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                if mod.affine:
                    mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
                if mod.running_mean is not None:
                    mod.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(mod, nn.GroupNorm) and mod.affine:
                mod.weight.copy_(torch.rand(mod.num_channels, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_channels, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "layer_scale":  # ConvNeXt: 1e-6 would hide every block
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for mod in model.modules():  # zero-initialised heads (ViT) would make every output 0
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and not mod.weight.any():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * mod.weight[0].numel() ** -0.5)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run a test module with ``$OBA_TEST_THREADS`` (default 1) torch threads, then restore.

    On a shared 2-core machine two intra-op threads contend with other processes and made small
    convolutions ~30x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OBA_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)
