"""The ``oba-fx`` command.

``oba-fx prune`` prunes a model to a FLOPs target and prints accuracy before and after, with a
per-layer table. Data and weights are found through flags or environment variables
(``--data`` / ``OBA_FX_DATA``, ``--weights`` / ``OBA_FX_WEIGHTS``), never a built-in path.

Example:
    >>> main(["prune", "--model", "no_such_model", "--data", "/nonexistent"])
    2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .criteria import REGISTRY, get_criterion
from oba_fx.errors import BadInputError, OBAError, one_line

if TYPE_CHECKING:  # the command line checks its arguments before torch is imported
    import torch

log = logging.getLogger("oba_fx.cli")

WEIGHTS_ENV = "OBA_FX_WEIGHTS"
DEFAULT_WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
                   "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}
# Fine-tuning learning rate by schedule: the paper's 1e-3 for its multi-step schedule; 3e-3 for the per-step
# cosine, measured best for one distilled epoch of pruned ResNet-56 (README, benchmarks/finetuned.py).
DEFAULT_LR = {"step": 1e-3, "cosine": 3e-3}


def _weights_path(args, data: Path) -> Path | None:
    if args.weights:
        return Path(args.weights)
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    name = DEFAULT_WEIGHTS.get(args.model)
    if name and (data / "weights" / name).exists():  # the npz folder may carry a weights/ folder
        return data / "weights" / name
    return None


def layer_table(report: dict, before: "torch.nn.Module", after: "torch.nn.Module") -> str:
    """Per-layer channels (out) and parameters, before and after."""
    import torch

    rows = [f"{'layer':34s} {'out ch before':>13s} {'after':>6s} {'params before':>13s} {'after':>8s}"]
    for name, m in before.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        try:
            m2 = after.get_submodule(name)
        except AttributeError:
            continue
        p1 = sum(p.numel() for p in m.parameters(recurse=False))
        p2 = sum(p.numel() for p in m2.parameters(recurse=False))
        rows.append(f"{name:34s} {w.shape[0]:13d} {m2.weight.shape[0]:6d} {p1:13d} {p2:8d}")
    return "\n".join(rows)


def _loaders(args, root: Path) -> dict:
    """Test, calibration and training loaders for ``--dataset`` (npz folder or torchvision)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from .data import cifar10_loader, torchvision_cifar

    if args.dataset == "npz":
        return {
            "exact 1k test images": cifar10_loader(root, "test_lossless1k", batch_size=250),
            "JPEG test images": cifar10_loader(root, "test", batch_size=500, limit=args.test_limit),
            "calib": cifar10_loader(root, "train", batch_size=args.batch_size,
                                    limit=args.batch_size * args.calib_batches, shuffle=True, seed=0),
            "train": lambda: cifar10_loader(root, "train", batch_size=args.batch_size, shuffle=True, augment=True,
                                            seed=0, limit=args.train_limit),
        }
    test = torchvision_cifar(root, train=False, download=args.download, dataset=args.dataset)
    train = torchvision_cifar(root, train=True, download=args.download, dataset=args.dataset)
    if args.test_limit:
        test = Subset(test, range(args.test_limit))
    g = torch.Generator().manual_seed(0)
    calib = Subset(train, torch.randperm(len(train), generator=g)[: args.batch_size * args.calib_batches].tolist())
    aug = torchvision_cifar(root, train=True, download=False, augment=True, dataset=args.dataset)
    return {
        "test images": DataLoader(test, batch_size=500),
        "calib": DataLoader(calib, batch_size=args.batch_size),
        "train": lambda: DataLoader(aug if not args.train_limit else Subset(aug, range(args.train_limit)),
                                    batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
    }


def _distill_options(args) -> dict | None:
    """``finetune`` keywords for the distillation flags (checked now, before minutes of work), or
    ``None`` when fine-tuning without a teacher."""
    if args.finetune_epochs <= 0 or not args.distill:
        return None
    if args.distill_temperature is not None and not args.distill_temperature > 0:
        raise BadInputError(f"--distill-temperature must be positive, got {args.distill_temperature}")
    if args.distill_weight is not None and not 0.0 <= args.distill_weight <= 1.0:
        raise BadInputError(f"--distill-weight is the share of the distillation loss and must be in [0, 1], "
                         f"got {args.distill_weight} (or use --no-distill)")
    return {k: v for k, v in (("temperature", args.distill_temperature), ("distill_weight", args.distill_weight))
            if v is not None}


def _prune_unstructured(model, calib, args):
    """``--unstructured``: :func:`oba_fx.prune_unstructured` (masks, not slimming)."""
    from .unstructured import prune_unstructured

    data = calib if get_criterion(args.criterion).needs_data else None
    return prune_unstructured(model, data, criterion=args.criterion, sparsity=args.sparsity, steps=args.steps,
                              merge=args.merge, max_batches=args.calib_batches, progress=not args.quiet)


def _sparsity_table(report: dict) -> str:
    rows = [f"{'weight':34s} {'numel':>9s} {'sparsity':>9s}"]
    rows += [f"{n:34s} {r['numel']:9d} {r['sparsity']:9.3f}" for n, r in report["layers"].items()]
    t = report["total"]
    rows.append(f"\ntotal: {t['zeros']:,} of {t['numel']:,} weights pruned ({t['sparsity']:.3f}); masks held by "
                "torch.nn.utils.parametrize (oba_fx.make_masks_permanent removes them)")
    return "\n".join(rows)




def _check_counts(args, at_least_one: tuple[str, ...], at_least_zero: tuple[str, ...] = ()) -> None:
    """Integer flags: those in ``at_least_one`` must be >= 1, those in ``at_least_zero`` >= 0
    (``None``, the flag's "no limit" default, passes)."""
    for flags, low in ((at_least_one, 1), (at_least_zero, 0)):
        for flag in flags:
            value = getattr(args, flag)
            if value is not None and value < low:
                what = "a positive integer" if low else "a non-negative integer"
                raise BadInputError(f"--{flag.replace('_', '-')} must be {what}, got {value}")


def _check_weights(args) -> None:
    """``--weights`` (or ``$OBA_FX_WEIGHTS``) names a readable torch checkpoint file."""
    from .files import check_checkpoint_file

    if args.weights:
        check_checkpoint_file(args.weights, "--weights")
    elif os.environ.get(WEIGHTS_ENV):
        check_checkpoint_file(os.environ[WEIGHTS_ENV], f"${WEIGHTS_ENV}")


def _check_prune_args(args) -> Path:
    """Everything that can be checked before minutes of work (flags, the criterion, the weights
    file, where the model goes); returns where the model goes."""
    from .files import check_writable

    if not 0.0 < args.target_flops <= 1.0:
        raise BadInputError(f"--target-flops is the retained FLOPs fraction and must be in (0, 1], got {args.target_flops}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise BadInputError(f"--checkpoint-every is a number of fine-tuning steps and must be a positive integer, "
                            f"got {args.checkpoint_every} (leave it out to checkpoint at epoch ends only)")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if args.finetune_epochs > 0 and args.batch_size % ranks:
        raise BadInputError(f"--batch-size {args.batch_size} is the global fine-tuning batch and must be a multiple "
                            f"of the {ranks} ranks; use e.g. --batch-size {ranks * max(1, args.batch_size // ranks)}")
    if args.unstructured and (args.sparsity is None or not 0.0 <= args.sparsity < 1.0):
        raise BadInputError(f"--unstructured needs --sparsity in [0, 1) (the fraction of weights removed), "
                            f"got {args.sparsity}")
    _check_counts(args, ("calib_batches", "batch_size", "steps", "test_limit", "train_limit"), ("finetune_epochs",))
    if args.lr is None:
        args.lr = DEFAULT_LR[args.lr_schedule]
    if not args.lr > 0:
        raise BadInputError(f"--lr is the fine-tuning learning rate and must be positive, got {args.lr}")
    get_criterion(args.criterion)  # an unknown name: the error lists the registered ones
    _check_weights(args)
    out = Path(args.out or Path("oba_fx_out") / f"{args.model}-flops{args.target_flops:g}.pt")
    check_writable(out, "--out", create=True)
    if args.report not in (None, "none"):
        check_writable(Path(args.report) / "index.html", "--report", create=True)
    return out


def _device(args):
    """``--device``: ``auto`` is this rank's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available,
    else the CPU. On CUDA, cuDNN picks its fastest kernels (``benchmark``) unless ``--deterministic``."""
    import torch

    if args.device == "auto":
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True)
    return device


def cmd_prune(args) -> int:
    out_path = _check_prune_args(args)  # before torch is imported: a bad flag fails in a fraction of a second
    distill = _distill_options(args)
    from . import prune_graph
    from .data import data_dir
    from .evaluate import evaluate
    from .io import save
    from .models import get_model

    data = data_dir(args.data)
    weights = _weights_path(args, data)
    classes = 100 if args.dataset == "cifar100" else 10
    device = _device(args)
    model = get_model(args.model, num_classes=classes, weights=str(weights) if weights else None).eval().to(device)
    if weights is None:
        log.warning("no pretrained weights given (--weights or %s): pruning random weights", WEIGHTS_ENV)
    loaders = _loaders(args, data)
    calib = loaders.pop("calib")
    train = loaders.pop("train")
    tests = loaders

    def accuracy(m, when: str):
        return [evaluate(m, dl, progress=not args.quiet, desc=f"accuracy {when}") for dl in tests.values()]

    teacher = copy.deepcopy(model) if distill is not None else None  # the dense model, before pruning
    x = next(iter(calib))[0][:1].to(device)
    t0 = time.time()
    acc = {"before": accuracy(model, "before")}
    kwargs = dict(criterion=args.criterion, target_flops=args.target_flops, steps=args.steps,
                  ranking=args.ranking, verbose=not args.quiet)
    kwargs.update(data=calib, max_batches=args.calib_batches, compensate=args.compensate,
                  bn_recalibration={"auto": None, "on": True, "off": False}[args.bn_recal])
    if args.unstructured:
        pruned = _prune_unstructured(model, calib, args)
    else:
        pruned = prune_graph(model, x, merge="similar" if args.merge else None, **kwargs)
    r = pruned.meta["oba"]
    how = [w for w, on in (("compensated", r.get("compensation")), ("BN recalibrated", r.get("bn_recalibrated")))
           if on]
    acc["after" + (f" ({', '.join(how)})" if how else "")] = accuracy(pruned, "after")
    history = None
    if args.finetune_epochs > 0:
        from .finetune import finetune

        # Under torchrun (or when resuming a sharded checkpoint) finetune shards the data: the batch size is the
        # global batch and a checkpoint resumes mid-epoch on any number of ranks. One process reads the loader as
        # given (its checkpoints resume on several ranks at an epoch end).
        history = finetune(pruned, train(), epochs=args.finetune_epochs, lr=args.lr, schedule=args.lr_schedule,
                           progress=not args.quiet,
                           checkpoint_dir=args.checkpoint_dir or f"{out_path}.ckpt", resume=args.resume,
                           checkpoint_every=args.checkpoint_every, teacher=teacher, **(distill or {}))
        how = " (distilled)" if teacher is not None else ""
        acc[f"after {args.finetune_epochs} fine-tuning epoch(s){how}"] = accuracy(pruned, "after fine-tuning")
    if args.unstructured:
        print(_sparsity_table(r))
    else:
        print(layer_table(r, model, pruned))
        print(f"\nFLOPs {r['flops_before']:,} -> {r['flops_after']:,} ({r['flops_after'] / r['flops_before']:.3f}); "
              f"params {r['params_before']:,} -> {r['params_after']:,} ({r['params_after'] / r['params_before']:.3f})")
    sizes = [len(dl.dataset) for dl in tests.values()]
    for k, accs in acc.items():
        parts = ", ".join(f"{100 * a:5.1f} % on {n} {name}" for a, n, name in zip(accs, sizes, tests))
        print(f"accuracy {k:40s}: {parts}")
    how = "unstructured" if args.unstructured else f"ranking {r['target']['ranking']}"
    print(f"({args.criterion}, {how}, {args.steps} step(s); {time.time() - t0:.0f} s)")
    from .distributed import is_main

    if not is_main():  # every rank built the same network; rank 0 writes it
        return 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save(pruned, out_path)
    print(f"saved the pruned model to {out_path} (load it with oba_fx.load, or oba-fx eval --model {out_path})")
    if args.report != "none" and not args.unstructured:
        args.out = str(out_path)
        print(f"report: {write_report(args, model, x, pruned, acc, tests, history)}")
    return 0


def write_report(args, model, x, pruned, acc: dict, tests: dict, history) -> Path:
    """The HTML report of ``oba-fx prune``: ``--report DIR``, by default next to ``--out``."""
    from .passes.pipeline import analyze_model
    from .report import write

    where = args.report or (f"{args.out}.report" if args.out else "oba_fx_report")
    accuracy = {k: dict(zip(tests, v)) for k, v in acc.items()}
    settings = {k: v for k, v in vars(args).items() if k not in ("fn", "cmd")}
    return write(pruned, where, analysis=analyze_model(model, (x,), hessian_structure=True), accuracy=accuracy, history=history,
                 settings=settings, name=args.model)


def cmd_explain(args) -> int:
    from .files import check_writable

    _check_counts(args, ("input_size",))
    _check_weights(args)
    check_writable(Path(args.out) / f"coupling.{args.format}", "--out", create=True)
    import torch

    from . import explain
    from .models import get_model

    model = get_model(args.model, weights=args.weights).eval()
    size = args.input_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    G = explain(model, torch.randn(1, 3, size, size), path=out / f"coupling.{args.format}",
                hessian_path=out / f"hessian.{args.format}")
    (out / "coupling.json").write_text(__import__("json").dumps(G.graph.get("barriers", []), indent=1))
    print(f"wrote {out}/coupling.{args.format} and {out}/hessian.{args.format} ({G.number_of_nodes()} nodes)")
    return 0


#: file name endings that make ``--model`` a saved model rather than a model name
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".th", ".pkl")


def _eval_model_file(args) -> Path | None:
    """The saved model ``oba-fx eval --model`` names, or ``None`` for a model name; a path that
    does not exist is an error here, not an "unknown model name" later."""
    from .errors import MissingFileError

    path = Path(args.model).expanduser()
    if path.is_file():
        return path
    if path.suffix in MODEL_FILE_SUFFIXES or os.sep in args.model:
        raise MissingFileError(f"--model {args.model!r}: no such file; pass a file written by oba-fx prune --out, "
                               "or a model name such as resnet56 (with --weights)")
    return None


def cmd_eval(args) -> int:
    _check_counts(args, ("test_limit",))
    saved = _eval_model_file(args)
    if saved is None:
        _check_weights(args)
    from .data import cifar10_loader, data_dir
    from .evaluate import evaluate
    from .io import load
    from .models import get_model

    data = data_dir(args.data)
    model = load(saved) if saved is not None else get_model(args.model, weights=args.weights)
    for split in ("test_lossless1k", "test"):
        acc = evaluate(model, cifar10_loader(data, split, batch_size=500, limit=args.test_limit))
        print(f"{split:16s} top-1 {100 * acc:5.1f} %")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oba-fx", description="Second-order structured pruning as torch.fx passes")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prune", help="prune a model to a FLOPs target and report accuracy before/after")
    pr.add_argument("--model", default="resnet56", help="built-in CIFAR model or torchvision name (default resnet56)")
    pr.add_argument("--weights", help=f"checkpoint path (or ${WEIGHTS_ENV}; default: DATA/weights/<model>-*.th)")
    pr.add_argument("--data", help="folder of CIFAR-10 npz files, or a torchvision root with --dataset (or $OBA_FX_DATA)")
    pr.add_argument("--dataset", default="npz", choices=["npz", "cifar10", "cifar100"],
                    help="npz: a folder like the project's CIFAR-10 arrays; cifar10/cifar100: torchvision datasets")
    pr.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs internet)")
    pr.add_argument("--target-flops", type=float, default=0.5, help="retained FLOPs fraction (default 0.5)")
    pr.add_argument("--criterion", default="l1", metavar="NAME",
                    help="pruning criterion (default l1): " + "; ".join(
                        f"{c.name}: {c.description}" + (" [needs data]" if c.needs_data else "")
                        for c in REGISTRY.values()))
    pr.add_argument("--ranking", default=None, choices=["group_max", "per_flop", "global", "curvature"],
                    help="how unit scores compare across layers (default: the criterion's own, else group_max)")
    pr.add_argument("--no-compensate", dest="compensate", action="store_false",
                    help="do not re-fit the layers that read removed channels (least squares on the calibration "
                         "images; on by default)")
    pr.add_argument("--bn-recal", default="auto", choices=["auto", "on", "off"],
                    help="re-estimate BatchNorm statistics after pruning (auto: only without compensation, "
                         "which recalibration would undo)")
    pr.add_argument("--calib-batches", type=int, default=8,
                    help="calibration batches (scores of data-driven criteria, BN recalibration)")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N JPEG test images")
    pr.add_argument("--steps", type=int, default=1, help="rescored pruning steps (exponential schedule)")
    pr.add_argument("--finetune-epochs", type=int, default=0,
                    help="fine-tune this many epochs after pruning, distilling from the dense model (see --no-distill)")
    pr.add_argument("--lr", type=float, default=None,
                    help="fine-tuning learning rate (default: 3e-3 with the cosine schedule, 1e-3 with step)")
    pr.add_argument("--lr-schedule", choices=["step", "cosine"], default="cosine",
                    help="cosine (default): --lr decayed every step to 0 along half a cosine (measured best for one "
                         "distilled epoch on ResNet-56, README); step: the paper's, --lr decayed at epoch milestones")
    pr.add_argument("--train-limit", type=int, default=None, help="fine-tune on the first N training images")
    pr.add_argument("--checkpoint-dir", default=None,
                    help="fine-tuning checkpoint folder (default OUT.ckpt); written by rank 0, readable on any "
                         "number of ranks")
    pr.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                    help="also checkpoint every STEPS fine-tuning steps (default: at epoch ends only)")
    pr.add_argument("--no-resume", dest="resume", action="store_false",
                    help="start fine-tuning afresh even if the checkpoint folder holds a checkpoint")
    pr.add_argument("--device", default="auto",
                    help="cpu, cuda, cuda:N (default auto: this rank's GPU under torchrun if CUDA is available)")
    pr.add_argument("--deterministic", action="store_true",
                    help="deterministic kernels (cuDNN without benchmark, torch.use_deterministic_algorithms): "
                         "reproducible on CUDA, slower")
    pr.add_argument("--no-distill", dest="distill", action="store_false",
                    help="fine-tune on the labels alone (default: distil from the dense model before pruning)")
    pr.add_argument("--distill-temperature", type=float, default=None, help="distillation temperature (default 4)")
    pr.add_argument("--distill-weight", type=float, default=None,
                    help="share of the distillation term in the fine-tuning loss, in [0, 1] (default 0.9)")
    pr.add_argument("--unstructured", action="store_true",
                    help="prune individual weights (masks) to --sparsity instead of channels to --target-flops")
    pr.add_argument("--sparsity", type=float, default=None, help="with --unstructured: fraction of weights removed")
    pr.add_argument("--merge", action="store_true",
                    help="CAMP-HiVe pair merging: fold each pruned weight into a cyclic kept partner (--unstructured) "
                         "or each removed channel into the most similar kept channel of its group")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.add_argument("--out", help="where to save the pruned GraphModule (oba_fx.save; default "
                                  "oba_fx_out/<model>-flops<target>.pt); the HTML report goes next to it")
    pr.add_argument("--report", default=None, metavar="DIR",
                    help="write the HTML report with pictures here (default: OUT.report next to --out, else "
                         "./oba_fx_report; 'none': no report)")
    pr.set_defaults(fn=cmd_prune)
    ex = sub.add_parser("explain", help="write the coupling and Hessian-block graphs of a model")
    ex.add_argument("--model", default="resnet56")
    ex.add_argument("--weights")
    ex.add_argument("--input-size", type=int, default=32)
    ex.add_argument("--format", default="svg", choices=["svg", "png", "dot", "graphml", "json"])
    ex.add_argument("--out", default="explain_out")
    ex.set_defaults(fn=cmd_explain)
    ev = sub.add_parser("eval", help="top-1 accuracy of a model name (with --weights) or a saved pruned model")
    ev.add_argument("--model", default="resnet56", help="model name or a file written by oba-fx prune --out")
    ev.add_argument("--weights")
    ev.add_argument("--data")
    ev.add_argument("--test-limit", type=int, default=None)
    ev.set_defaults(fn=cmd_eval)
    return p


@contextlib.contextmanager
def _ranks(device: str = "auto"):
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (gloo on the CPU, nccl with
    CUDA) for data-parallel calibration and fine-tuning; only rank 0 prints and writes files."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if cuda:  # NCCL needs each rank on its own GPU before the group forms
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    quiet = dist.get_rank() != 0
    saved = sys.stdout
    if quiet:
        sys.stdout = open(os.devnull, "w")
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = saved
        if joined:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a usage or input error)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        with _ranks(getattr(args, "device", "auto")):
            return args.fn(args)
    except (OBAError, ValueError, OSError, KeyError, RuntimeError) as e:  # bad input: one line, no traceback
        print(f"oba-fx: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
