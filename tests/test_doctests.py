"""The docstring examples of the library run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import oba_fx
import oba_fx.passes

MODULES = sorted(
    {m.name for m in pkgutil.walk_packages(oba_fx.__path__, "oba_fx.")}
    | {m.name for m in pkgutil.walk_packages(oba_fx.passes.__path__, "oba_fx.passes.")}
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
