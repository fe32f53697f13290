"""``deepcopy_modules`` copies a module tree as ``copy.deepcopy`` does (the trace's copy)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from oba_fx.module_copy import deepcopy_modules


class Odd(nn.Module):
    """A module with its own ``__deepcopy__``: it must be copied its way."""

    def __init__(self) -> None:
        super().__init__()
        self.copied_by_hand = False

    def __deepcopy__(self, memo):
        new = Odd()
        new.copied_by_hand = True
        return new


class Tricky(nn.Module):
    """Shared submodule, a module also held in a plain list, hooks, a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, groups=1)
        self.b = self.a  # the same module under two names
        self.extra = [self.a, {"k": (1, 2.0, "s")}]
        self.odd = Odd()
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.register_forward_hook(_hook)
        self.sizes = (3, 4)


def _hook(module, args, out):
    return out


def _layout(m: nn.Module) -> list:
    return [(n, type(x).__name__, sorted(x.__dict__)) for n, x in m.named_modules(remove_duplicate=False)]


def test_copy_has_the_layout_of_copy_deepcopy():
    m = Tricky()
    assert _layout(deepcopy_modules(m, {})) == _layout(copy.deepcopy(m))


def test_shared_objects_stay_shared_in_the_copy_and_only_there():
    m = Tricky()
    c = deepcopy_modules(m, {})
    assert c.b is c.a and c.extra[0] is c.a and c.a is not m.a
    assert c.extra is not m.extra and c.extra[1] == m.extra[1]


def test_a_class_with_its_own_deepcopy_is_copied_its_way():
    assert deepcopy_modules(Tricky(), {}).odd.copied_by_hand


def test_memo_tensors_are_shared_and_the_others_copied():
    m = Tricky()
    c = deepcopy_modules(m, {id(m.a.weight): m.a.weight})
    assert c.a.weight is m.a.weight
    assert c.a.bias is not m.a.bias and torch.equal(c.a.bias, m.a.bias)


def test_changing_the_copy_leaves_the_original_alone():
    m = Tricky()
    c = deepcopy_modules(m, {})
    c.a.groups = 2
    c._forward_hooks.clear()
    c._non_persistent_buffers_set.clear()
    del c.odd
    assert m.a.groups == 1 and len(m._forward_hooks) == 1 and m._non_persistent_buffers_set == {"scratch"}
    assert "odd" in m._modules


def test_copy_computes_what_the_original_computes():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(deepcopy_modules(m, {})(x), m(x))


def test_an_empty_dict_held_twice_is_one_new_dict_in_the_copy():
    m = nn.Linear(2, 2)
    m.table = {}
    m.same_table = m.table
    c = deepcopy_modules(m, {})
    assert c.table is c.same_table and c.table is not m.table
    c.table["k"] = 1
    assert m.table == {}
