"""No production function takes a test-only parameter: a leading-underscore keyword (a hook such
as ``precompute(..., _stop_after_shards=)``) is a fault the tests inject through a seam instead
(``tests/conftest.py``: ``stop_precompute_after_shards``, ``stop_scoring_after_parts``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import megadistill


def _functions(module):
    for obj in vars(module).values():
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            yield from (v for v in vars(obj).values() if inspect.isfunction(v))
        elif inspect.isfunction(obj) and obj.__module__ == module.__name__:
            yield obj


def test_no_function_takes_a_private_parameter():
    found = []
    for info in pkgutil.walk_packages(megadistill.__path__, "megadistill."):
        if info.name.endswith("__main__"):  # runs the command line on import
            continue
        module = importlib.import_module(info.name)
        for fn in _functions(module):
            # A lone "_" is a placeholder for an argument a callback signature hands over unused.
            private = [p for p in inspect.signature(fn).parameters if p.startswith("_") and p != "_"]
            if private:
                found.append(f"{info.name}.{fn.__qualname__}({', '.join(private)})")
    assert not found, found
