"""Keep the README's config reference in step with the config dataclasses (``make config-reference``:
``python -m megadistill.cli.readme``)."""

from __future__ import annotations

import sys
from pathlib import Path

from megadistill.config import explain

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str) -> str:
    """``readme`` with the block between the markers replaced by ``explain(markdown=True)``."""
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{explain(markdown=True)}{END}{tail}"


def main(path: str = "README.md") -> int:
    p = Path(path)
    p.write_text(render(p.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
