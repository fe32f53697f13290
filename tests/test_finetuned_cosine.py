"""``benchmarks/finetuned.py``: ``--schedule cosine`` is the same distilled SGD as ``finetune``, with the
learning rate of step ``k`` of ``n`` equal to ``lr * (1 + cos(pi k / n)) / 2``; ``--resume`` keeps one protocol."""
import math

import pytest
import torch
from torch import nn

from _bench import load_benchmark
from _oracle import one_thread  # noqa: F401
from oba_fx.distill import distillation_loss


def _setup():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
               for _ in range(5)]
    return student, teacher, batches


def _by_hand(student, teacher, batches, epochs, lr):
    """Plain SGD with momentum 0.9 and weight decay 5e-4 written out, the cosine learning rate per step."""
    params, bufs, n = list(student.parameters()), None, epochs * len(batches)
    for k in range(n):
        x, y = batches[k % len(batches)]
        loss = distillation_loss(student(x), teacher(x).detach(), y)
        grads = torch.autograd.grad(loss, params)
        step_lr = lr * 0.5 * (1 + math.cos(math.pi * k / n))
        with torch.no_grad():
            d = [g + 5e-4 * p for g, p in zip(grads, params)]
            bufs = d if bufs is None else [0.9 * b + di for b, di in zip(bufs, d)]
            for p, b in zip(params, bufs):
                p -= step_lr * b


def test_cosine_finetune_matches_hand_written_sgd():
    student, teacher, batches = _setup()
    expected = [p.detach().clone() for p in student.parameters()]
    ref = nn.Linear(4, 3).double()
    ref.load_state_dict(student.state_dict())
    _by_hand(ref, teacher, batches, epochs=2, lr=0.3)
    load_benchmark("finetuned.py").cosine_finetune(student, teacher, batches, epochs=2, lr=0.3)
    moved = max((p - e).abs().max().item() for p, e in zip(student.parameters(), expected))
    diff = max((p - r).abs().max().item() for p, r in zip(student.parameters(), ref.parameters()))
    assert moved > 1e-2  # the weights did train, so the comparison below can fail
    assert diff <= 1e-12 * max(1.0, moved)


def test_resume_refuses_a_result_of_another_recipe():
    ft = load_benchmark("finetuned.py")
    old = {"model": "resnet56", "seed": 1, "calib": 512, "epochs": 1}  # written before --lr existed
    ft.check_same_protocol(old, dict(old, lr=1e-3, schedule="constant"), "x.json")  # same recipe: fine
    with pytest.raises(SystemExit, match="x.json was run with other settings.*'schedule': \\('constant', 'cosine'\\)"):
        ft.check_same_protocol(old, dict(old, lr=1e-3, schedule="cosine"), "x.json")
