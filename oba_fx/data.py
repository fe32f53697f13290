"""Finding and loading CIFAR-10, and measuring accuracy.

The library never guesses where data lives: :func:`data_dir` takes an explicit folder, else the
environment variable ``OBA_FX_DATA``.  The folder holds the npz files described below.

npz layout (``cifar10_train.npz``, ``cifar10_test.npz``, ``cifar10_test_lossless1k.npz``):
``x`` uint8 NHWC (N, 32, 32, 3) RGB, ``y`` int64 (N,) in 0-9.  The full train/test files are
JPEG-degraded copies (pretrained ResNets score ~10 points lower on them); the lossless1k file
holds the exact first 1,000 test images, for comparisons with published accuracies.

Normalisation: the pretrained CIFAR ResNets (akamaster) were trained with the ImageNet statistics
:data:`MEAN` = (0.485, 0.456, 0.406) and :data:`STD` = (0.229, 0.224, 0.225) applied to pixels in
[0, 1], so every loader here uses them.

Example:
    >>> import os
    >>> from oba_fx.data import data_dir, cifar10_loader
    >>> from oba_fx.evaluate import evaluate
    >>> from oba_fx.models import get_model
    >>> d = data_dir()                                   # doctest: +SKIP
    >>> loader = cifar10_loader(d, "test_lossless1k", batch_size=250)   # doctest: +SKIP
    >>> model = get_model("resnet20", weights=os.path.join(d, "weights/resnet20-12fca82f.th"))  # doctest: +SKIP
    >>> evaluate(model, loader)                          # doctest: +SKIP
    0.915
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from oba_fx.errors import BadFileError, BadInputError, MissingFileError, MissingSettingError, one_line

__all__ = [
    "ENV_VAR",
    "MEAN",
    "SPLITS",
    "STD",
    "cifar10_loader",
    "data_dir",
    "load_cifar10_npz",
    "normalize",
    "torchvision_cifar",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the data folder.
ENV_VAR = "OBA_FX_DATA"

#: Per-channel mean (RGB, pixels in [0, 1]) the pretrained CIFAR ResNets were trained with (ImageNet's).
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel std (RGB, pixels in [0, 1]) the pretrained CIFAR ResNets were trained with (ImageNet's).
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: split name -> npz file name inside the data folder.
SPLITS: dict[str, str] = {
    "train": "cifar10_train.npz",
    "test": "cifar10_test.npz",
    "test_lossless1k": "cifar10_test_lossless1k.npz",
}


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: ``explicit`` if given, else ``$OBA_FX_DATA``.

    Args:
        explicit: A folder passed by the caller (e.g. a ``--data DIR`` option).

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        MissingSettingError: (a ``RuntimeError``) neither ``explicit`` nor ``OBA_FX_DATA`` is set.
        MissingFileError: (a ``FileNotFoundError``) the folder named does not exist or is not a
            directory.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> data_dir(d) == Path(d)
        True
    """
    if explicit is not None:
        path, source = Path(explicit), "the path passed in"
    else:
        env = os.environ.get(ENV_VAR)
        if not env:
            raise MissingSettingError(
                "no data folder given: pass --data DIR (or data_dir(explicit=DIR)) or set the "
                f"environment variable {ENV_VAR}=DIR, where DIR holds {', '.join(SPLITS.values())}"
            )
        path, source = Path(env), f"${ENV_VAR}"
    path = path.expanduser()
    if not path.is_dir():
        raise MissingFileError(f"data folder {str(path)!r} (from {source}) does not exist or is not a directory")
    return path


def normalize(x_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB images -> float32 NCHW normalised with :data:`MEAN` / :data:`STD`.

    Example:
        >>> import numpy as np
        >>> normalize(np.zeros((1, 32, 32, 3), np.uint8)).shape
        torch.Size([1, 3, 32, 32])
    """
    x = torch.as_tensor(x_uint8_nhwc)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def load_cifar10_npz(
    dir: str | os.PathLike, split: str, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one CIFAR-10 npz split as normalised tensors.

    Args:
        dir: The data folder (see :func:`data_dir`).
        split: ``"train"`` (50,000, JPEG-degraded), ``"test"`` (10,000, JPEG-degraded) or
            ``"test_lossless1k"`` (the exact first 1,000 test images).
        limit: Keep only the first ``limit`` images (before normalising, so it is cheap).

    Returns:
        ``(x, y)``: ``x`` float32 (N, 3, 32, 32) normalised with :data:`MEAN` / :data:`STD`;
        ``y`` int64 (N,).

    Raises:
        ValueError: Unknown split, or a file without the expected arrays.
        MissingFileError: (a ``FileNotFoundError``) the folder or the split's file is missing.
        BadFileError: (an ``OSError``) the file cannot be read as an npz archive.

    Example:
        >>> x, y = load_cifar10_npz(data_dir(), "test_lossless1k", limit=8)   # doctest: +SKIP
        >>> x.shape, y.shape                                               # doctest: +SKIP
        (torch.Size([8, 3, 32, 32]), torch.Size([8]))
    """
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    folder = Path(dir)
    if not folder.is_dir():
        raise MissingFileError(
            f"data folder {str(folder)!r} does not exist; it should hold {', '.join(SPLITS.values())}"
        )
    path = folder / SPLITS[split]
    if not path.is_file():
        raise MissingFileError(
            f"CIFAR-10 file {str(path)!r} for split {split!r} is missing; the data folder should hold "
            f"{', '.join(SPLITS.values())}"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise BadFileError(f"cannot read CIFAR-10 file {str(path)!r} as an npz archive: {one_line(exc)}; it "
                           "may be truncated: copy it again") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise BadInputError(f"{str(path)!r} is a single .npy array, not an npz archive with 'x' and 'y'")
    with archive as d:
        if "x" not in d.files or "y" not in d.files:
            raise BadInputError(f"{str(path)!r} has arrays {d.files}; expected 'x' (uint8 NHWC) and 'y' (int64)")
        try:
            xs, ys = d["x"], d["y"]
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise BadFileError(f"cannot read arrays from CIFAR-10 file {str(path)!r}: {one_line(exc)}; it may be "
                               "truncated: copy it again") from exc
    if xs.dtype != np.uint8 or xs.ndim != 4 or xs.shape[1:] != (32, 32, 3) or len(ys) != len(xs):
        raise BadInputError(
            f"{str(path)!r}: expected x uint8 (N, 32, 32, 3) and y (N,), got x {xs.dtype} {xs.shape}, y {ys.shape}"
        )
    if limit is not None:
        xs, ys = xs[:limit], ys[:limit]
    logger.debug("loaded %s: %d images", path, len(xs))
    return normalize(xs), torch.from_numpy(np.ascontiguousarray(ys)).long()


class _AugmentedTensorDataset(Dataset):
    """Random crop (4-pixel zero padding, in pixel space) and horizontal flip on normalised tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, padding: int = 4) -> None:
        self.x, self.y, self.padding = x, y, padding
        # A black pixel (0 before normalising) is -mean/std after normalising.
        self.fill = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        p = self.padding
        c, h, w = img.shape
        padded = self.fill.expand(c, h + 2 * p, w + 2 * p).clone()
        padded[:, p : p + h, p : p + w] = img
        top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
        out = padded[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            out = out.flip(-1)
        return out.contiguous(), self.y[i]


def cifar10_loader(
    dir: str | os.PathLike,
    split: str,
    batch_size: int,
    limit: int | None = None,
    shuffle: bool = False,
    augment: bool = False,
    num_workers: int = 0,
    seed: int | None = None,
) -> DataLoader:
    """A DataLoader of ``(x, y)`` batches from one npz split (see :func:`load_cifar10_npz`).

    Args:
        dir: The data folder.
        split: ``"train"``, ``"test"`` or ``"test_lossless1k"``.
        batch_size: Images per batch.
        limit: Use only the first ``limit`` images.
        shuffle: Reshuffle every epoch.
        augment: Standard CIFAR augmentation (random 32x32 crop of the image zero-padded by 4,
            random horizontal flip).
        num_workers: DataLoader worker processes.
        seed: Seeds the shuffling order (``None``: torch's global RNG).

    Returns:
        A :class:`torch.utils.data.DataLoader`.

    Example:
        >>> loader = cifar10_loader(data_dir(), "test", batch_size=100, limit=500)   # doctest: +SKIP
        >>> len(loader)                                                            # doctest: +SKIP
        5
    """
    x, y = load_cifar10_npz(dir, split, limit=limit)
    dataset: Dataset = _AugmentedTensorDataset(x, y) if augment else TensorDataset(x, y)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator
    )


def torchvision_cifar(
    root: str | os.PathLike,
    train: bool,
    download: bool = False,
    augment: bool = False,
    dataset: str = "cifar10",
) -> Dataset:
    """A ``torchvision.datasets.CIFAR10``/``CIFAR100`` with this library's normalisation.

    For users who have the original CIFAR python archives (torchvision layout) under ``root``.

    Args:
        root: torchvision dataset root (holding ``cifar-10-batches-py``).
        train: Train or test split.
        download: Let torchvision download the archive if absent.
        augment: Random crop (padding 4) and horizontal flip.
        dataset: ``"cifar10"`` or ``"cifar100"``.

    Returns:
        The torchvision dataset, yielding normalised float tensors and int labels.

    Raises:
        BadInputError: (a ``ValueError``) unknown ``dataset``.
        MissingFileError: (a ``FileNotFoundError``) the files are absent and ``download`` is False.

    Example:
        >>> ds = torchvision_cifar("~/datasets", train=False)   # doctest: +SKIP
        >>> ds[0][0].shape                                     # doctest: +SKIP
        torch.Size([3, 32, 32])
    """
    import torchvision
    from torchvision import transforms as T

    classes = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    if dataset not in classes:
        raise BadInputError(f"unknown dataset {dataset!r}; expected one of {sorted(classes)}")
    steps: list = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    root = os.path.expanduser(os.fspath(root))
    try:
        return classes[dataset](root=root, train=train, download=download, transform=T.Compose(steps))
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise MissingFileError(f"{dataset} not found (or corrupted) under {root!r}: {one_line(exc)} (CLI: "
                               "--download)") from exc
