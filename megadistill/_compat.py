"""Which megatron-core releases megadistill runs on, and what differs between them.

Supported and tested: **0.16.x** and **0.19.x** (the whole test suite runs on 0.16.1 and on
0.19.2: ``make test`` and ``make test MCORE=0.19.2``). 0.17.x and 0.18.x lie between two tested
releases and are expected to work -- every fact below that changed was measured to differ between
0.16 and 0.19, and those releases are taken to be on the 0.19 side of it -- but no test runs on
them. Anything older than 0.16 or newer than 0.19 is refused where a version gate applies.

Every version difference the rest of the package needs is answered here, by a function of the
version string, so that no other module compares version numbers:

* the CPU compatibility layer (:mod:`megadistill.megatron.cpu`): which ``torch.cuda`` calls its
  stand-in ``torch.cuda`` must answer (:func:`cpu_cuda_calls`);
* checkpoints: whether a release writes its common (non-tensor) state to ``common.pt``
  (:func:`writes_common_pt`), whether it can read one that has none
  (:func:`reads_checkpoint_without_common_pt`), and whether its writer forks processes
  (:func:`forks_checkpoint_writers`);
* the notices 0.19 prints on every model build, DDP wrapper, save and legacy load, which nothing
  a megadistill user does can act on (:func:`quiet_known_messages`).

A leaf module: it imports nothing from megadistill, and reads the installed version without
importing megatron-core (whose package ``__init__`` loads most of the library; 0.19's needs triton).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

SUPPORTED = ("0.16", "0.19")
"""The megatron-core minor releases megadistill is tested on."""
UNTESTED = ("0.17", "0.18")
"""Minor releases between the supported ones: expected to work, not tested."""

_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
_FIRST_WITHOUT_COMMON_PT = (0, 17)  # the first release after 0.16 (see writes_common_pt)
_FIRST_WITH_STREAM_CALL = (0, 17)
_FIRST_WITH_WRITER_THREADS = (0, 17)


class UnknownMegatronVersion(RuntimeError):
    """megatron-core is missing, or its version cannot be read."""


def parse(version: str) -> tuple[int, int, int]:
    """``"0.19.2+abc1234"`` -> ``(0, 19, 2)``; raises ValueError for a string that is no version."""
    match = _VERSION.match(version.strip())
    if match is None:
        raise ValueError(f"megatron-core version {version!r} is not of the form MAJOR.MINOR[.PATCH]")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def minor(version: str) -> str:
    """``"0.19.2"`` -> ``"0.19"``."""
    major, minor_, _ = parse(version)
    return f"{major}.{minor_}"


def installed_version() -> str:
    """The version of the megatron-core that ``import megatron.core`` loads, e.g. ``"0.16.1"``.

    Read from that package's ``package_info.py`` (its ``MAJOR``/``MINOR``/``PATCH``/``PRE_RELEASE``
    constants) without importing it, or from the imported module's constants. Not from its
    ``__version__``: 0.19's appends ``+<git sha>`` of whatever git work tree its files sit in (a
    virtualenv inside a checkout, say), which says nothing about megatron-core. Raises :class:`UnknownMegatronVersion` when
    megatron-core is not installed or its version cannot be read."""
    loaded = sys.modules.get("megatron.core.package_info")
    if loaded is not None:  # its constants, not __version__: the same answer before and after the import
        return f"{loaded.MAJOR}.{loaded.MINOR}.{loaded.PATCH}{getattr(loaded, 'PRE_RELEASE', '')}"
    spec = importlib.util.find_spec("megatron")  # the namespace/package only: nothing is imported
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        info = Path(root) / "core" / "package_info.py"
        if info.is_file():
            return _read_package_info(info)
    raise UnknownMegatronVersion("megatron-core is not installed (no megatron/core/package_info.py on sys.path)")


def _read_package_info(path: Path) -> str:
    """``MAJOR.MINOR.PATCH`` + ``PRE_RELEASE`` from the literal assignments in ``path``."""
    found: dict[str, object] = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"):
                try:
                    found[name] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    if not all(k in found for k in ("MAJOR", "MINOR", "PATCH")):
        raise UnknownMegatronVersion(f"cannot read megatron-core's version from {path}")
    return f"{found['MAJOR']}.{found['MINOR']}.{found['PATCH']}{found.get('PRE_RELEASE', '')}"


def is_supported(version: str) -> bool:
    """Whether ``version`` belongs to a tested minor release (:data:`SUPPORTED`)."""
    try:
        return minor(version) in SUPPORTED
    except ValueError:
        return False


def is_untested(version: str) -> bool:
    """Whether ``version`` lies between the supported releases (:data:`UNTESTED`)."""
    try:
        return minor(version) in UNTESTED
    except ValueError:
        return False


def supported_text() -> str:
    """``"0.16.x or 0.19.x"``: the supported releases, for messages."""
    return " or ".join(f"{m}.x" for m in SUPPORTED)


def unsupported_message(version: str, what: str) -> Optional[str]:
    """None for a supported ``version``; else one line saying that ``what`` (e.g. "megadistill's CPU
    compatibility layer") supports only :data:`SUPPORTED`, naming ``version``."""
    if is_supported(version):
        return None
    between = " (0.17/0.18 are expected to work but untested)" if is_untested(version) else ""
    return (
        f"{what} supports megatron-core {supported_text()}, but megatron-core {version} is installed{between}"
    )


# -- the CPU compatibility layer ---------------------------------------------------------------

_CPU_CUDA_CALLS = frozenset({"current_device", "synchronize", "get_rng_state", "manual_seed"})
_STREAM_CALLS = frozenset({"current_stream", "default_stream"})


def cpu_cuda_calls(version: str) -> frozenset[str]:
    """The ``torch.cuda`` functions megatron-core ``version`` calls on the paths megadistill runs on
    CPU (gloo), which the CPU layer's stand-in ``torch.cuda`` must answer; any other ``torch.cuda``
    attribute stays the real one, so that an unexpected CUDA call fails loudly.

    Every release: ``current_device`` (buffers), ``synchronize`` (p2p, checkpoint writer),
    ``get_rng_state``/``manual_seed`` (the model-parallel RNG tracker). From 0.17 on also
    ``current_stream`` (and its twin ``default_stream``): DDP's ``start_grad_sync``
    (``distributed/param_and_grad_buffer.py``) takes the current stream on every gradient sync."""
    calls = _CPU_CUDA_CALLS
    if parse(version)[:2] >= _FIRST_WITH_STREAM_CALL:
        calls = calls | _STREAM_CALLS
    return calls


def imports_triton(version: str) -> bool:
    """Whether ``import megatron.core`` of ``version`` imports triton (its MoE paged-stash ops,
    reached from the pipeline schedules and GPTModel): from 0.17 on. That import is most of the
    larger per-process memory a CPU rank of 0.19 holds (``megadistill.plan.memory``)."""
    return parse(version)[:2] >= _FIRST_WITH_STREAM_CALL


# -- checkpoints -------------------------------------------------------------------------------

COMMON_PT = "common.pt"
"""The file in which megatron-core 0.16 keeps a checkpoint's common (non-tensor) state."""


def writes_common_pt(version: str) -> bool:
    """Whether megatron-core ``version`` writes a checkpoint's common (non-tensor) state to
    ``common.pt``. 0.16 does; 0.19 stores it as an object inside the torch_dist files
    (``__*.distcp``) and writes no ``common.pt``."""
    return parse(version)[:2] < _FIRST_WITHOUT_COMMON_PT


def reads_checkpoint_without_common_pt(version: str) -> bool:
    """Whether megatron-core ``version`` can read a checkpoint that has no ``common.pt`` (one
    written by 0.17 or later). 0.19 reads both kinds; 0.16 only checkpoints with ``common.pt``."""
    return not writes_common_pt(version)


def forks_checkpoint_writers(version: str) -> bool:
    """Whether megatron-core ``version``'s torch_dist writer forks a process per write bucket for
    every save, synchronous ones included (0.16: two per rank by default). 0.19 writes from
    threads of the saving process (one file per rank by default) and forks nothing."""
    return parse(version)[:2] < _FIRST_WITH_WRITER_THREADS


# -- log noise ---------------------------------------------------------------------------------

_KNOWN_MESSAGES = {
    # Once per model built (student, teacher, every rank): megadistill builds GPTModel itself.
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    # Once per DDP wrapper with the distributed optimizer: the layout it computes is the default one.
    "megatron.core.distributed.distributed_data_parallel": "full_param_layout not provided",
    # Once per process that saves: a synchronous save runs megatron's async machinery inline.
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    # Once per load of a checkpoint with common.pt (written by 0.16), which 0.19 reads correctly.
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
}


class _DropKnownMessage(logging.Filter):
    """Drop one logger's records that contain ``text``; let every other record through."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_messages() -> None:
    """Silence megatron-core 0.19's notices that megadistill's users cannot act on (see
    ``_KNOWN_MESSAGES``; together about a quarter of the CPU demo's output lines), and its
    "MimoModelConfig is experimental" import warning. Only those exact messages of those loggers
    are dropped. Needs no megatron import (logging returns the same logger objects to megatron
    later); idempotent; harmless on 0.16, which logs none of them."""
    warnings.filterwarnings("ignore", message=r"MimoModelConfig is experimental", category=UserWarning)
    for name, text in _KNOWN_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropKnownMessage(text))
