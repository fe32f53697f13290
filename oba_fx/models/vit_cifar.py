"""A small Vision Transformer for 32x32 CIFAR images, written with plain, FX-traceable ops.

Layout (pre-norm, no dropout):

* ``patch_embed``: ``nn.Conv2d(3, dim, patch, stride=patch)``; with ``patch = 4`` a 32x32 image
  becomes an 8x8 grid, i.e. 64 tokens (``flatten(2).transpose(1, 2)``).
* a learned class token (``cls_token``, expanded to the batch) is concatenated in front, and a
  learned position embedding (``pos_embed``, one row per token) is added;
* ``depth`` :class:`Block` s: ``x = x + attn(ln1(x))`` then ``x = x + mlp(ln2(x))``;
* a final ``norm`` (LayerNorm), token 0 is taken, and the ``head`` Linear gives the logits.

Attention is written out by hand (:class:`Attention`): one ``qkv`` Linear, a reshape to
``(B, N, 3, heads, head_dim)`` with the head count and head size as *module constants* (never read
from a tensor's shape), ``F.scaled_dot_product_attention``, and a ``proj`` Linear.  So a graph
pass sees the heads as a reshape of the ``qkv`` output and can rewrite the constants when heads
are removed.

Default size (for training on a CPU): ``dim=128, depth=6, heads=4`` (head size 32),
``mlp_dim=256``: 811,146 parameters for 10 classes.

Checkpoints written by ``benchmarks/train_vit_cifar.py`` hold the constructor arguments under
``"config"``; :func:`load_vit_cifar` rebuilds the model from such a file.

Example:
    >>> import torch
    >>> m = vit_cifar(dim=16, depth=2, heads=2, mlp_dim=32).eval()
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in vit_cifar().parameters())
    811146
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from oba_fx.errors import BadInputError

__all__ = ["Attention", "Block", "MLP", "ViTCifar", "load_vit_cifar", "vit_cifar"]

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    """Multi-head self-attention: ``qkv`` Linear, scaled dot-product attention per head, ``proj``.

    Args:
        dim: Token width (input and output).
        heads: Number of heads; ``dim`` must be divisible by it.

    Attributes:
        num_heads: Number of heads (a plain int, used in the forward's reshape).
        head_dim: Width of one head, ``dim // heads``.

    Example:
        >>> import torch
        >>> a = Attention(dim=8, heads=2)
        >>> a.num_heads, a.head_dim, a.qkv.out_features
        (2, 4, 24)
        >>> a(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise BadInputError(f"dim {dim} is not divisible by heads {heads}")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


class MLP(nn.Module):
    """``fc1`` Linear, GELU, ``fc2`` Linear.

    Example:
        >>> import torch
        >>> MLP(8, 16)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    Example:
        >>> import torch
        >>> Block(dim=8, heads=2, mlp_dim=16)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class ViTCifar(nn.Module):
    """Vision Transformer for 32x32 images (see the module documentation for the layout).

    Args:
        image_size: Input height and width.
        patch: Patch size (stride of the patch-embedding convolution); must divide ``image_size``.
        dim: Token width.
        depth: Number of transformer blocks.
        heads: Attention heads per block.
        mlp_dim: Hidden width of each block's MLP.
        num_classes: Outputs of ``head``.
        in_chans: Input channels.

    Attributes:
        config: The constructor arguments, as a dict (what checkpoints store).

    Example:
        >>> import torch
        >>> m = ViTCifar(dim=16, depth=1, heads=4, mlp_dim=32, num_classes=3)
        >>> m.pos_embed.shape, m.blocks[0].attn.head_dim
        (torch.Size([1, 65, 16]), 4)
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_dim: int = 256,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise BadInputError(f"patch {patch} does not divide image_size {image_size}")
        self.config: dict[str, int] = dict(
            image_size=image_size, patch=patch, dim=dim, depth=depth, heads=heads,
            mlp_dim=mlp_dim, num_classes=num_classes, in_chans=in_chans,
        )  # fmt: skip
        num_tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise: truncated normal (std 0.02) for Linear weights and the two embeddings,
        zero biases, unit LayerNorm scales, and the patch convolution like a Linear of its fan-in.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        fan_in = self.patch_embed.in_channels * self.patch_embed.kernel_size[0] * self.patch_embed.kernel_size[1]
        bound = (1.0 / fan_in) ** 0.5
        nn.init.uniform_(self.patch_embed.weight, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, tokens, dim)
        B = x.shape[0]
        cls = self.cls_token.expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit_cifar(num_classes: int = 10, **kwargs: Any) -> ViTCifar:
    """The default small CIFAR ViT (dim 128, depth 6, 4 heads of 32, MLP 256, patch 4).

    Args:
        num_classes: Outputs of the classifier.
        **kwargs: Any other :class:`ViTCifar` argument (``dim``, ``depth``, ``heads``, ...).

    Example:
        >>> m = vit_cifar()
        >>> len(m.blocks), m.blocks[0].attn.num_heads, m.blocks[0].mlp.fc1.out_features
        (6, 4, 256)
    """
    return ViTCifar(num_classes=num_classes, **kwargs)


def load_vit_cifar(path: str | os.PathLike) -> ViTCifar:
    """Rebuild a :class:`ViTCifar` from a checkpoint holding ``"config"`` and ``"state_dict"``.

    The format written by ``benchmarks/train_vit_cifar.py``:
    ``{"model": "vit_cifar", "config": {...}, "state_dict": ..., ...}``.  A file without
    ``"config"`` is loaded into the default model.  Read with ``weights_only=True``.

    Args:
        path: The checkpoint file.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) ``path`` does not exist.
        BadFileError: (an ``OSError``) the file is not a readable torch checkpoint.
        BadInputError: (a ``ValueError``) the file holds no state_dict, or names another model.
        RuntimeError: Keys or shapes do not match (from ``load_state_dict``).

    Example:
        >>> import os, tempfile, torch
        >>> m = vit_cifar(dim=16, depth=1, heads=2, mlp_dim=32)
        >>> f = os.path.join(tempfile.mkdtemp(), "vit.pt")
        >>> torch.save({"model": "vit_cifar", "config": m.config, "state_dict": m.state_dict()}, f)
        >>> load_vit_cifar(f).blocks[0].mlp.fc1.out_features
        32
    """
    from .checkpoints import read_checkpoint

    path = os.fspath(path)
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise BadInputError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a dict")
    name = obj.get("model", "vit_cifar")
    if isinstance(name, str) and name != "vit_cifar":
        raise BadInputError(f"checkpoint {path!r} is for model {name!r}, not 'vit_cifar'")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        raise BadInputError(f"checkpoint {path!r} holds no state_dict")
    config = dict(obj.get("config") or {})
    model = ViTCifar(**config)
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    logger.info("loaded %s: ViTCifar(%s)", path, config)
    return model.eval()
