"""Test-only patch set: run megatron-core 0.16.1 on a CPU-only torch with gloo.

Megatron-core assumes a GPU in a handful of places: it allocates buffers on
``torch.cuda.current_device()``, builds masks with ``device="cuda"``, keeps its model-parallel
RNG states in the CUDA generator, and calls ``torch.cuda.synchronize()``. On a CPU-only torch
those calls raise "Torch not compiled with CUDA enabled" -- or, worse, silently do nothing
(``torch.cuda._lazy_call`` queues work that never runs, so a "set RNG state" is dropped).

:func:`apply` patches those sites for the current process. It is idempotent, a no-op when CUDA
is available, and must never be imported by production code (tests and the CPU harness only).
It touches megatron-core's modules only; the real ``torch`` / ``torch.cuda`` modules are left
alone, except for the duration of one megatron method (site 4).

Patched sites (megatron-core 0.16.1; each one is reached by tests/test_cpu_harness.py, and
removing any of them makes that test fail with "Torch not compiled with CUDA enabled"):

1. ``torch.cuda.current_device()`` used as a *device*, ``device="cuda"`` literals and
   ``torch.cuda.synchronize()``. The module-global ``torch`` of each module below is replaced by
   :class:`_CpuTorch`, a thin proxy whose ``torch.cuda`` answers ``current_device()`` with the
   CPU device (and ``synchronize()`` with a no-op), and whose tensor factories map
   ``device="cuda"`` to CPU; every other attribute is the real torch one.

   - ``utils.py``: ``GlobalMemoryBuffer.get_tensor`` (attention's score buffer);
   - ``tensor_parallel/mappings.py``: all-gather / reduce-scatter output buffers (gathering
     vocab-parallel logits, sequence parallel);
   - ``tensor_parallel/layers.py``: weight allocation when ``use_cpu_initialization=False``
     (the GPU default) and the all-gather buffers in the linear layers' autograd functions;
   - ``models/common/embeddings/rotary_pos_embedding.py``: ``inv_freq`` is moved to
     ``current_device()`` on the first forward;
   - ``pipeline_parallel/p2p_communication.py``: shape / receive buffers and the
     ``torch.cuda.synchronize()`` after ``batch_isend_irecv``;
   - ``pipeline_parallel/schedules.py``: ``total_num_tokens = torch.zeros(..., device="cuda")``
     at the start of every schedule.

2. ``tensor_parallel/random.py``, the model-parallel RNG tracker. Its module ``torch`` gets the
   same proxy, whose ``cuda.get_rng_state`` / ``manual_seed`` act on the CPU
   default generator (the one CPU kernels such as dropout and ``init`` draw from: the role the
   CUDA generator plays on a GPU), and its helpers ``_get_cuda_rng_state`` /
   ``_set_cuda_rng_state`` (which reach into ``torch.cuda.default_generators`` and
   ``torch.cuda._lazy_call``) are replaced by CPU-generator versions. This makes
   ``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()`` (attention dropout,
   TP weight init) and the RNG restore of activation recompute work. The tracker's "CPU RNG state
   changed within GPU RNG context" warning is filtered out: with one generator it always fires.

3. ``transformer/utils.py`` ``get_default_causal_mask`` (``torch.ones(..., device="cuda")``):
   replaced by a CPU version, both there and in ``fusions/fused_softmax.py``, which imported it
   by name. (``transformer/utils.py`` defines ``jit_fuser`` = ``torch.compile`` functions, so it
   gets a function swap rather than the ``torch`` proxy, which dynamo would have to trace.)

4. ``LanguageModule.setup_embeddings_and_output_layer`` runs ``weight.data = weight.data.cuda()``
   before all-reducing the tied embedding between the first and last pipeline stage. It is
   wrapped so that, only while it runs, ``Tensor.cuda`` returns the tensor unchanged.

Not patched (not reached by a dense GPTModel with the local spec under TP/PP without DDP):
Megatron's DDP, distributed optimizer and grad clipping (literal ``device='cuda'``,
``torch.cuda.FloatTensor`` checks), dist-checkpointing (``torch.cuda.synchronize`` /
``current_device``), ``tensor_parallel/utils.py`` 1-D split/gather buffers (recompute with
``distribute_saved_activations``), ``tensor_parallel/data.py`` ``broadcast_data``, context
parallel (``rope_utils`` ``.cuda()``), ``get_sliding_window_causal_mask``, non-vanilla
``softmax_type`` (``dot_product_attention.py``), inference and MoE code. Each still raises
"Torch not compiled with CUDA enabled" if reached: add its module to ``_PROXIED_MODULES`` (with
the reason) when a test needs it.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Callable

import torch

_CPU = torch.device("cpu")
_applied = False


def _is_cuda_device(device: Any) -> bool:
    """True for anything torch would read as a CUDA device ("cuda", "cuda:1", device, bare int)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare ordinal means cuda:<n> to torch's factories
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


# Tensor factories whose ``device=`` argument the proxy rewrites from CUDA to CPU.
_FACTORIES = frozenset(
    {
        "arange", "as_tensor", "empty", "empty_like", "full", "full_like", "ones", "ones_like",
        "rand", "randint", "randn", "tensor", "zeros", "zeros_like",
    }
)  # fmt: skip


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return call


class _CpuCuda:
    """What ``torch.cuda`` looks like from inside a patched megatron module.

    Only the calls megatron makes on its CPU-reachable paths are redirected; any other attribute is
    the real ``torch.cuda`` one (so an unexpected CUDA call still fails loudly).
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    # -- device and synchronisation ------------------------------------------------------------
    @staticmethod
    def current_device() -> torch.device:
        # In the patched modules the result is used only as a ``device=`` argument (random.py's
        # generator-index uses are in the helpers replaced by apply()). CPU is the only device.
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        # CPU ops and gloo's waited requests are already complete when they return.
        pass

    # -- RNG: the CPU default generator stands in for the CUDA one -----------------------------
    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _CpuTorch:
    """Proxy for the ``torch`` module inside one megatron module: CUDA-device requests become CPU.

    Attribute access falls through to the real ``torch`` (``torch.Tensor``, ``torch.distributed``,
    ``torch.nn`` ... are the genuine objects), except ``cuda`` (a :class:`_CpuCuda`) and the
    tensor factories in ``_FACTORIES``.
    """

    def __init__(self) -> None:
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            attr = _on_cpu(attr)
            setattr(self, name, attr)  # cache: later look-ups skip __getattr__
        return attr

    def __repr__(self) -> str:
        return "<megadistill CPU proxy of module 'torch'>"


# Megatron modules whose global ``torch`` is swapped for the proxy, and why (module docstring, 1-2).
_PROXIED_MODULES = {
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor: buffer on current_device()",
    "megatron.core.tensor_parallel.mappings": "gather/scatter buffers on current_device()",
    "megatron.core.tensor_parallel.layers": "weights / gather buffers on current_device()",
    "megatron.core.tensor_parallel.random": "tracker: torch.cuda.get_rng_state / manual_seed",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq.to(current_device())",
    "megatron.core.pipeline_parallel.p2p_communication": "buffers on current_device(), synchronize()",
    "megatron.core.pipeline_parallel.schedules": 'total_num_tokens = torch.zeros(device="cuda")',
}


def _get_cpu_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """CPU replacement for ``random._get_cuda_rng_state`` (always returns a fresh copy)."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU replacement for ``random._set_cuda_rng_state``.

    The original goes through ``torch.cuda._lazy_call``, which on a CPU-only torch queues the
    call forever: the tracker's ``fork()`` would silently never switch RNG streams.
    """
    torch.set_rng_state(new_state)


class _DropSameGeneratorWarning(logging.Filter):
    """Drop the tracker's "CPU RNG state changed within GPU RNG context" warning.

    ``fork()`` warns when the CPU generator moved while the CUDA one was forked. With the CPU
    generator standing in for the CUDA one, every random op inside a fork moves it: the warning
    would fire on every attention-dropout / init call and means nothing here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """CPU replacement for ``transformer.utils.get_default_causal_mask`` (True = masked out)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _tensor_cuda_identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _with_tensor_cuda_as_identity(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``method`` so that ``Tensor.cuda()`` returns the tensor itself while it runs."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = _tensor_cuda_identity
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper._megadistill_cpu_patch = True  # type: ignore[attr-defined]
    return wrapper


def apply() -> None:
    """Apply the CPU patches once per process (idempotent; does nothing when CUDA is available)."""
    global _applied
    if _applied or torch.cuda.is_available():
        return

    # Sites 1 and 2: module-local ``torch`` proxies.
    for name in _PROXIED_MODULES:
        module = importlib.import_module(name)
        if module.torch is torch:
            module.torch = _CpuTorch()

    # Site 2: the tracker's get/set helpers, looked up as module globals by its methods.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state
    logger = logging.getLogger(random.__name__)
    if not any(isinstance(f, _DropSameGeneratorWarning) for f in logger.filters):
        logger.addFilter(_DropSameGeneratorWarning())

    # Site 3: the default causal mask, in its home module and where it was imported by name.
    for name in ("megatron.core.transformer.utils", "megatron.core.fusions.fused_softmax"):
        importlib.import_module(name).get_default_causal_mask = _cpu_default_causal_mask

    # Site 4: ``weight.data.cuda()`` while tying embeddings across pipeline stages.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    method = LanguageModule.setup_embeddings_and_output_layer
    if not getattr(method, "_megadistill_cpu_patch", False):
        LanguageModule.setup_embeddings_and_output_layer = _with_tensor_cuda_as_identity(method)

    _applied = True
