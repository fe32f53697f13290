"""Dense float64 Hessian oracles for the tests (a helper module, not a test file).

Everything is built from plain reverse mode, row by row: ``H[i] = ∇_θ (∇_θ L)_i`` with
``torch.autograd.grad`` double backward. ``torch.func.hessian`` / ``jacrev(jacrev(·))`` are not
used: in torch 2.14.1 they return wrong blocks for LayerNorm weights (``docs/design.md`` "Which Hessian blocks"). One
finite-difference helper checks the oracle itself.

The functions of a flat parameter vector run the model with ``torch.func.functional_call`` in
its current train/eval mode, with buffers copied, so the model is never changed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


def default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


@dataclass
class Flat:
    """A flat view of some of a model's parameters."""

    model: nn.Module
    names: list[str]
    theta: torch.Tensor  # float64-or-model-dtype flat vector, detached

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        params = dict(self.model.named_parameters())
        for n in self.names:
            k = params[n].numel()
            out[n] = vec[i:i + k].view_as(params[n])
            i += k
        return out

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def logits(self, vec: torch.Tensor, x: Any) -> torch.Tensor:
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        params.update(self.unflatten(vec))
        bufs = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return functional_call(self.model, (params, bufs), (x,))


def flat_params(model: nn.Module, names: Sequence[str] | None = None) -> Flat:
    names = list(names) if names is not None else [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names]).clone()
    return Flat(model, names, theta)


def _rows(out: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """Jacobian of the flat ``out`` w.r.t. ``wrt`` (built in the graph), one reverse pass per row."""
    flat = out.reshape(-1)
    rows = []
    for k in range(flat.numel()):
        (r,) = torch.autograd.grad(flat[k], wrt, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(wrt) if r is None else r)
    return torch.stack(rows) if rows else torch.zeros(0, wrt.numel(), dtype=wrt.dtype)


def dense_hessian(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """``∇² f(θ)`` row by row with double backward."""
    t = theta.detach().clone().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(t), t, create_graph=True)
        return _rows(g, t).detach()


def dense_gradient(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    t = theta.detach().clone().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(t), t, allow_unused=True)
    return torch.zeros_like(t) if g is None else g.detach()


def dense_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """``∂ fn(θ) / ∂θ`` as a (numel(out), numel(θ)) matrix, one backward per output entry."""
    t = theta.detach().clone().requires_grad_()
    with torch.enable_grad():
        return _rows(fn(t), t).detach()


@dataclass
class Hessians:
    """Dense quantities of one batch, all float64 (or the model dtype)."""

    loss: torch.Tensor
    grad: torch.Tensor
    H: torch.Tensor
    H_GN: torch.Tensor

    @property
    def H_F(self) -> torch.Tensor:
        return self.H - self.H_GN


def batch_hessians(model: nn.Module, x: Any, y: Any, names: Sequence[str] | None = None,
                   loss_fn: Callable = default_loss) -> tuple[Flat, Hessians]:
    """Dense ``H``, ``H_GN = Jᵀ ∇²_z ℓ J`` and ``g`` of ``loss_fn(model(x), y)`` w.r.t. ``names``."""
    fp = flat_params(model, names)

    def loss_of(vec: torch.Tensor) -> torch.Tensor:
        return loss_fn(fp.logits(vec, x), y)

    H = dense_hessian(loss_of, fp.theta)
    g = dense_gradient(loss_of, fp.theta)
    with torch.no_grad():
        z = fp.logits(fp.theta, x)
        loss = loss_fn(z, y)
    J = dense_jacobian(lambda v: fp.logits(v, x), fp.theta)
    Hz = dense_hessian(lambda zf: loss_fn(zf.view_as(z), y), z.detach().reshape(-1))
    return fp, Hessians(loss.detach(), g, H, J.T @ Hz @ J)


def finite_difference_hvp(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, v: torch.Tensor,
                          eps: float = 1e-5) -> torch.Tensor:
    """``(∇f(θ + εv) − ∇f(θ − εv)) / 2ε`` (central differences of the exact gradient)."""
    return (dense_gradient(f, theta + eps * v) - dense_gradient(f, theta - eps * v)) / (2 * eps)


def finite_difference_check(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, H: torch.Tensor,
                            n_dirs: int = 3, eps: float = 1e-5, seed: int = 0) -> float:
    """Largest relative error ``|H v − FD(v)| / |H v|`` over ``n_dirs`` random directions and the
    basis vectors of the largest diagonal entries (so single blocks are checked too)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = [torch.randn(theta.shape, generator=gen, dtype=theta.dtype) for _ in range(n_dirs)]
    for i in H.diagonal().abs().topk(min(3, theta.numel())).indices.tolist():
        e = torch.zeros_like(theta)
        e[i] = 1.0
        dirs.append(e)
    worst = 0.0
    for v in dirs:
        hv = H @ v
        fd = finite_difference_hvp(f, theta, v, eps)
        worst = max(worst, float((hv - fd).norm() / hv.norm().clamp_min(1e-30)))
    return worst


def empirical_fisher_diag(model: nn.Module, x: Any, y: Any, names: Sequence[str] | None = None,
                          loss_fn: Callable = default_loss) -> torch.Tensor:
    """Flat ``(1/N) Σ_n g_n²`` with ``g_n = ∇_θ loss_fn(z_n, y_n)``, ``z_n`` row ``n`` of the batch's
    logits; one backward per sample through a flat parameter vector."""
    fp = flat_params(model, names)
    t = fp.theta.clone().requires_grad_()
    with torch.enable_grad():
        z = fp.logits(t, x)
        G = _rows(torch.stack([loss_fn(z[i:i + 1], y[i:i + 1]) for i in range(z.shape[0])]), t)
    return G.square().mean(0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max|b|`` (``max|a − b|`` when ``b`` is zero)."""
    scale = b.abs().max()
    err = (a - b).abs().max()
    return float(err / scale) if scale > 0 else float(err)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester Hadamard matrix of the smallest power-of-two order ``≥ n`` (±1, orthogonal rows)."""
    m = torch.ones(1, 1, dtype=dtype)
    while m.shape[0] < n:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m


# --------------------------------------------------------------------------------------------
# tiny float64 models (each exercises one kind of curvature of ``docs/design.md`` "Which Hessian blocks")
# --------------------------------------------------------------------------------------------


class TanhMLP(nn.Module):
    """Smooth everywhere: every (a, b) block of H_F, diagonal ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ResBNCNN(nn.Module):
    """Conv-BN-ReLU, conv-BN, residual add, ReLU, pooling, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class GeluLNBlock(nn.Module):
    """Linear, GELU, LayerNorm (whose weights torch.func.hessian gets wrong), residual, head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)
        self.proj = nn.Linear(4, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(F.gelu(self.fc1(x)) + self.proj(x)))


class SelfAttention(nn.Module):
    """Single head: softmax(q kᵀ / √d) v with Linear q, k, v and out, mean over tokens, head."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / self.d ** 0.5, dim=-1)
        return self.head((x + self.out(a @ self.v(x))).mean(1))


class SEGate(nn.Module):
    """Squeeze-excitation: h * sigmoid(fc(pool(h))), a bilinear op of two paths from one layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1)))
        h = h * gate[:, :, None, None]
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _split_heads(t: torch.Tensor, heads: int, d_head: int) -> torch.Tensor:
    """(B, N, heads * d_head) -> (B, heads, N, d_head)."""
    return t.reshape(t.shape[0], t.shape[1], heads, d_head).transpose(1, 2)


def _merge_heads(t: torch.Tensor, d: int) -> torch.Tensor:
    """(B, heads, N, d_head) -> (B, N, d)."""
    t = t.transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], d)


class AttentionOnly(nn.Module):
    """Separate q, k, v Linears on the input, 2-head ``F.scaled_dot_product_attention``, out
    Linear, mean over tokens, head. No LayerNorm and no residual, so the blocks are sparse: q and
    k reach the softmax (q–q, k–k, q–k), q, k and v meet in ``A @ v`` (q–v, k–v), and v reaches
    only the value operand and the linear path after it (v–v is an exact zero)."""

    def __init__(self, d: int = 4, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)
        self.d, self.heads = d, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(f(x), self.heads, self.d // self.heads) for f in (self.q, self.k, self.v))
        a = _merge_heads(F.scaled_dot_product_attention(q, k, v), self.d)
        return self.head(self.out(a).mean(1))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: LayerNorm, separate q, k, v Linears, 2-head
    ``F.scaled_dot_product_attention``, out Linear, residual; LayerNorm, Linear–GELU–Linear MLP,
    residual; mean over tokens, head. Attention, softmax, LayerNorm and GELU curvature in one model."""

    def __init__(self, d: int = 4, hidden: int = 6, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)
        self.d, self.heads = d, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = (_split_heads(f(h), self.heads, self.d // self.heads) for f in (self.q, self.k, self.v))
        x = x + self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v), self.d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics (so eval ≠ train mode)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64))
                m.num_batches_tracked.fill_(7)


class FunctionalLayers(nn.Module):
    """Layers written as functions of their module's tensors: ``F.conv2d`` on a conv's weight,
    ``F.batch_norm`` on a BatchNorm's statistics and affine (timm's ``BatchNormAct2d``; batch
    statistics in train mode), ``F.group_norm`` on a GroupNorm's affine, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.gn = nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        h = F.relu(F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                                self.training, 0.1, self.bn.eps))
        h = F.group_norm(F.conv2d(h, self.conv2.weight, self.conv2.bias), 2, self.gn.weight, self.gn.bias)
        return self.fc(F.relu(h).mean((2, 3)))


#: name -> (constructor, input shape without batch, number of classes)
TOY_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "tanh_mlp": (TanhMLP, (4,), 3),
    "res_bn_cnn": (ResBNCNN, (2, 4, 4), 3),
    "gelu_layernorm": (GeluLNBlock, (4,), 3),
    "self_attention": (SelfAttention, (3, 4), 3),
    "se_gate": (SEGate, (2, 4, 4), 3),
    "attention_only": (AttentionOnly, (3, 4), 3),
    "transformer_block": (TransformerBlock, (3, 4), 3),
    "functional_layers": (FunctionalLayers, (2, 4, 4), 3),
}


def make_toy(name: str, seed: int = 0, batch: int = 5, n_batches: int = 2) -> tuple[nn.Module, list]:
    """A float64 toy model (eval mode) and ``n_batches`` random ``(x, y)`` batches."""
    ctor, shape, classes = TOY_MODELS[name]
    torch.manual_seed(seed)
    model = ctor().double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    _randomise_bn(model, gen)
    data = [(torch.randn((batch, *shape), generator=gen, dtype=torch.float64),
             torch.randint(0, classes, (batch,), generator=gen)) for _ in range(n_batches)]
    return model, data


@functools.lru_cache(maxsize=None)
def dense_case(name: str, mode: str = "eval", n_batches: int = 2) -> tuple[nn.Module, list, list]:
    """``(model, batches, [(Flat, Hessians) per batch])`` for a toy model in ``mode`` (cached;
    callers must not modify the model)."""
    model, data = make_toy(name, n_batches=n_batches)
    model.train(mode == "train")
    with math_attention():
        dense = [batch_hessians(model, x, y) for x, y in data]
    return model, data, dense


def math_attention():
    """Scaled-dot-product attention on the math kernel (the fused CPU one has no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


#: every toy model in eval mode, plus the BatchNorm models in train mode
CASES = [(name, "eval") for name in TOY_MODELS] + [("res_bn_cnn", "train"), ("functional_layers", "train")]
IDS = [f"{n}-{m}" for n, m in CASES]


@pytest.fixture(autouse=True)
def one_thread_per_test():
    """Tiny models: one thread avoids oversubscription on the shared 2-core machine (import this
    fixture into a test module to use it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
