"""The config reference: every key with its default and its field docstring
(``megadistill config --explain``, the README's reference table)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from megadistill.config.schema import CHOICES, RunConfig


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string right after each field) from the sources of the class and
    of the dataclasses it extends."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def explain(markdown: bool = False) -> str:
    """Every config key with its default and one-line description."""
    lines = []

    def walk(cls, prefix: str, default_obj) -> None:
        docs = _field_docs(cls)
        if markdown:
            lines.append(f"\n### `{prefix or 'top level'}` — {cls.__doc__.strip().splitlines()[0]}\n")
            lines.append("| key | default | meaning |")
            lines.append("|---|---|---|")
        else:
            lines.append(f"\n[{prefix or 'top level'}]  {cls.__doc__.strip().splitlines()[0]}")
        nested = []
        for f in dataclasses.fields(cls):
            value = getattr(default_obj, f.name)
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(value):
                nested.append((type(value), key, value))
                continue
            doc = docs.get(f.name, "")
            if key in CHOICES:
                doc += f" Choices: {', '.join(map(str, CHOICES[key]))}."
            if markdown:
                lines.append(f"| `{key}` | `{value!r}` | {doc} |")
            else:
                lines.append(f"  {key} = {value!r}\n      {doc}")
        for cls2, key, value in nested:
            walk(cls2, key, value)

    walk(RunConfig, "", RunConfig())
    return "\n".join(lines).strip() + "\n"
