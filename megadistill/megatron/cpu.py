"""CPU compatibility layer: run megatron-core (0.16.x or 0.19.x) on a CPU-only torch with gloo.

When it applies: only when asked for. The test harness and the CPU demo call :func:`apply`
themselves; the training driver calls :func:`apply_if_needed` with the process group's backend,
which applies the layer only for **gloo on a machine without CUDA**. Whether a job may run on gloo
at all is decided before that by ``megadistill.launch.choose_backend``, which refuses a job that
was given GPUs torch cannot see (so a GPU job with a broken CUDA never lands here). Real runs
belong on GPUs; nothing here is reached when CUDA is available.

The patches name megatron-core call sites of the supported releases (0.16.x and 0.19.x; which
``torch.cuda`` calls each one makes comes from :func:`megadistill._compat.cpu_cuda_calls`).
:func:`apply` checks the installed version and refuses any other with
:class:`UnsupportedMegatronVersion`: a moved site would otherwise fail obscurely, or silently
misbehave (an RNG state that is never set). ``MEGADISTILL_CPU_ANY_MCORE=1`` tries anyway.

Megatron-core assumes a GPU in a handful of places: it allocates buffers on
``torch.cuda.current_device()``, builds masks with ``device="cuda"``, keeps its model-parallel
RNG states in the CUDA generator, and calls ``torch.cuda.synchronize()``. On a CPU-only torch
those calls raise "Torch not compiled with CUDA enabled" -- or, worse, silently do nothing
(``torch.cuda._lazy_call`` queues work that never runs, so a "set RNG state" is dropped).

:func:`apply` patches those sites for the current process. It is idempotent and a no-op when
CUDA is available; importing this module changes nothing until :func:`apply` is called.
It touches megatron-core's modules only; the real ``torch`` / ``torch.cuda`` modules are left
alone, except for the duration of three megatron functions (sites 4 and 5).

Patched sites (megatron-core 0.16.1 and 0.19.2, the same in both but where said; each one is
reached by tests/megatron/test_cpu_harness.py or, for Megatron's DDP and optimizers,
tests/megatron/test_cpu_ddp_optimizer.py, and removing any of them makes that test fail with
"Torch not compiled with CUDA enabled" or a ``torch.cuda.FloatTensor`` type error):

1. ``torch.cuda.current_device()`` used as a *device*, ``device="cuda"`` literals and
   ``torch.cuda.synchronize()``. The module-global ``torch`` of each module below is replaced by
   :class:`_CpuTorch`, a thin proxy whose ``torch.cuda`` answers ``current_device()`` with the
   CPU device (and ``synchronize()`` with a no-op), and whose tensor factories map
   ``device="cuda"`` to CPU; every other attribute is the real torch one. From 0.17 on, the
   proxy also answers ``current_stream()``/``default_stream()`` with a stream whose waits are
   no-ops (DDP's ``start_grad_sync`` takes the current stream on every gradient sync, to wait on
   CUDA-graph events megadistill never records); on 0.16 those stay the real, failing calls.

   - ``utils.py``: ``GlobalMemoryBuffer.get_tensor`` (attention's score buffer), and
     ``local_multi_tensor_l2_norm`` (the grad norm's fallback without Apex / Transformer Engine);
   - ``tensor_parallel/mappings.py``: all-gather / reduce-scatter output buffers (gathering
     vocab-parallel logits, sequence parallel);
   - ``tensor_parallel/layers.py``: weight allocation when ``use_cpu_initialization=False``
     (the GPU default) and the all-gather buffers in the linear layers' autograd functions;
   - ``models/common/embeddings/rotary_pos_embedding.py``: ``inv_freq`` is moved to
     ``current_device()`` on the first forward;
   - ``pipeline_parallel/p2p_communication.py``: shape / receive buffers and the
     ``torch.cuda.synchronize()`` after ``batch_isend_irecv``;
   - ``pipeline_parallel/schedules.py``: ``total_num_tokens = torch.zeros(..., device="cuda")``
     at the start of every schedule;
   - ``distributed/param_and_grad_buffer.py``: DDP's contiguous param and grad buffers (the
     distributed optimizer's shards are views of them) on ``current_device()``, and (0.19)
     ``torch.cuda.current_stream()`` at the top of ``start_grad_sync``;
   - ``optimizer/optimizer.py``: ``MixedPrecisionOptimizer`` (the base of
     ``DistributedOptimizer``) keeps ``found_inf``, ``_dummy_overflow_buf`` and ``_scale_one`` on
     ``device='cuda'``, ``FP32Optimizer`` its ``_scale``;
   - ``optimizer/clip_grads.py``: the grad-norm and zero-count accumulators, ``device='cuda'``.

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

5. ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers:
   ``clip_grads.clip_grad_by_total_norm_fp32`` asserts it for every grad (and ``optimizer.py``
   imported the function by name), and ``DistributedOptimizer._build_model_and_main_param_groups``
   sorts parameters into fp32 / fp16 / bf16 by it, raising ``TypeError`` for a CPU tensor. Both
   are wrapped so that, only while they run, the no-argument ``Tensor.type()`` names a CPU tensor
   as its CUDA twin (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``); ``t.type(dtype)``
   conversions are unchanged. (``DistributedOptimizer.__init__``'s own check only looks for
   16-bit params, so fp32 passes it untouched.)

6. ``dist_checkpointing`` of model weights (``torch_dist`` format): ``filesystem_async.py``
   calls ``torch.cuda.synchronize()`` before writing, ``state_dict_saver.py`` puts its failure
   flag on ``current_device()``, ``strategies/torch.py`` and ``exchange_utils.py`` build load
   buffers there; their ``torch`` gets the proxy. (6b) A synchronous save passes its write
   results through a queue from a *spawn*-context ``Manager``, a fresh interpreter per process
   (~3 s per test rank) that outlives a rank killed with SIGKILL. Not a CPU matter:
   ``megadistill.megatron.checkpoint.install_write_results_queue`` puts a fork-context queue in
   its place before every save, on any machine; the layer installs it too, for direct
   ``dist_checkpointing.save`` calls (a teacher checkpoint in a test, say).

7. The distributed optimizer's checkpoint paths: ``distrib_optimizer.py`` allocates the
   never-stepped optimizer's dummy state in ``load_state_dict`` and the all-gather buffers of
   ``get_parameter_state_dp_zero`` (the ``fully_reshardable`` format) on ``current_device()``
   (module ``torch`` -> proxy), and moves the send buffers there with ``send_tensor.cuda()``
   (``get_parameter_state_dp_zero`` is wrapped like site 4). ``dp_reshardable`` needs neither
   once megadistill.megatron.optimizer_state initialised the state (tests/megatron/test_checkpoint.py covers
   both).
   The legacy ``dp_zero_gather_scatter`` format and the memory-efficient (gloo) variant of
   ``fully_reshardable`` run through the same code but are untested.

8. Half-precision students (``model.precision`` bf16/fp16): ``Float16OptimizerWithFloat16Params``
   and ``DistributedOptimizer`` sort parameters by ``param.type()`` in ``__init__`` (wrapped like
   site 5); ``optimizer/grad_scaler.py`` keeps fp16's loss scale and its factors on
   ``device='cuda'`` (module ``torch`` -> proxy) and reloads the scale with ``.cuda(...)``
   (``DynamicGradScaler.load_state_dict`` wrapped like site 4). Reached by tests/megatron/test_precision.py.

With sites 1 and 5, ``DistributedDataParallel`` (``overlap_grad_reduce=False``, grads
all-reduced or reduce-scattered on gloo) and ``get_megatron_optimizer`` (``FP32Optimizer`` or
``DistributedOptimizer`` over torch ``AdamW``, grad-norm clipping, ``log_num_zeros_in_grad``)
train fp32 models on CPU/gloo: DP=2 and TP=2 match one rank and plain torch to ~1e-6.

Not patched (not reached by a dense GPTModel with the local spec under TP/PP, DDP and the
(distributed) optimizer): optimizer offload (``optimizer.py``
``offload_to_cpu`` / ``.cuda()``, ``HybridDeviceOptimizer``), several distributed-optimizer
instances (CUDA streams in ``param_and_grad_buffer.py`` and ``distributed_data_parallel.py``),
``nccl_ub``, ``tensor_parallel/utils.py`` 1-D split/gather buffers (recompute with
``distribute_saved_activations``), ``tensor_parallel/data.py`` ``broadcast_data``, context
parallel (``rope_utils`` ``.cuda()``), ``get_sliding_window_causal_mask``, non-vanilla
``softmax_type`` (``dot_product_attention.py``), inference and MoE code. Each still fails
loudly if reached ("Torch not compiled with CUDA enabled", or a ``torch.cuda.*Tensor`` type
check): add its module to ``_PROXIED_MODULES`` (with the reason) when a test needs it.

One module despite its length: the layer is one patch set, version-checked and applied as a unit,
and more than a quarter of the file is the list of patched sites above, kept beside the patches so
that each site's reason and its fix are read together.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from typing import Any, Callable, Mapping, Optional

import torch

from megadistill import _compat
from megadistill.launch import LaunchError

_CPU = torch.device("cpu")
_applied = False

ANY_MCORE_VARIABLE = "MEGADISTILL_CPU_ANY_MCORE"
"""Set to 1 to apply the layer to another megatron-core version anyway (at your own risk)."""


class UnsupportedMegatronVersion(LaunchError):
    """The installed megatron-core is not one the CPU layer was written for."""


def check_megatron_version(version: Optional[str] = None, env: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`UnsupportedMegatronVersion` unless megatron-core ``version`` (default: the
    installed one) is a supported release (``megadistill._compat.SUPPORTED``: 0.16.x, 0.19.x), or
    ``MEGADISTILL_CPU_ANY_MCORE=1`` (then only warn)."""
    if version is None:
        version = _compat.installed_version()
    problem = _compat.unsupported_message(version, "megadistill's CPU compatibility layer")
    if problem is None:
        return
    message = f"{problem}: its CUDA-only call sites may have moved, so a CPU run could fail obscurely or silently misbehave"
    if env.get(ANY_MCORE_VARIABLE, "").strip() == "1":
        warnings.warn(f"{message} ({ANY_MCORE_VARIABLE}=1: applying it anyway)", stacklevel=3)
        return
    raise UnsupportedMegatronVersion(
        f"{message}. Install megatron-core {_compat.supported_text()} for CPU runs, or set {ANY_MCORE_VARIABLE}=1 "
        "to try anyway"
    )


def needed(backend: str, cuda_available: Optional[bool] = None) -> bool:
    """Whether the driver must apply the layer: a gloo process group and no CUDA device."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return backend == "gloo" and not cuda_available


def apply_if_needed(backend: str) -> bool:
    """The driver's policy: :func:`apply` for a ``backend`` (``"gloo"``/``"nccl"``) process group
    on a machine without CUDA, else nothing. Returns whether the layer is now applied."""
    if not needed(backend):
        return False
    apply()
    return True


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


class _CpuStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: every wait is already satisfied (CPU ops
    and gloo's waited requests are complete when they return)."""

    def wait_event(self, event: Any = None) -> None:
        pass

    def wait_stream(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


class _CpuCuda:
    """What ``torch.cuda`` looks like from inside a patched megatron module.

    Only the calls the installed megatron-core makes on its CPU-reachable paths are redirected
    (``calls``, from ``megadistill._compat.cpu_cuda_calls``); any other attribute is the real
    ``torch.cuda`` one, so an unexpected CUDA call still fails loudly. Each stand-in is the
    ``_cpu_<name>`` static method below.
    """

    def __init__(self, calls: frozenset[str]) -> None:
        for name in calls:
            setattr(self, name, getattr(self, f"_cpu_{name}"))  # AttributeError: a call with no stand-in

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    # -- device and synchronisation ------------------------------------------------------------
    @staticmethod
    def _cpu_current_device() -> torch.device:
        # In the patched modules the result is used only as a ``device=`` argument (random.py's
        # generator-index uses are in the helpers replaced by apply()). CPU is the only device.
        return _CPU

    @staticmethod
    def _cpu_synchronize(device: Any = None) -> None:
        # CPU ops and gloo's waited requests are already complete when they return.
        pass

    @staticmethod
    def _cpu_current_stream(device: Any = None) -> _CpuStream:
        return _CPU_STREAM

    @staticmethod
    def _cpu_default_stream(device: Any = None) -> _CpuStream:
        return _CPU_STREAM

    # -- RNG: the CPU default generator stands in for the CUDA one -----------------------------
    @staticmethod
    def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def _cpu_manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _CpuTorch:
    """Proxy for the ``torch`` module inside one megatron module: CUDA-device requests become CPU.

    Attribute access falls through to the real ``torch`` (``torch.Tensor``, ``torch.distributed``,
    ``torch.nn`` ... are the genuine objects), except ``cuda`` (a :class:`_CpuCuda`) and the
    tensor factories in ``_FACTORIES``.
    """

    def __init__(self, cuda_calls: frozenset[str]) -> None:
        self.cuda = _CpuCuda(cuda_calls)

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
    # Megatron's DDP and its optimizers (sites 1 and 5 of the module docstring).
    "megatron.core.distributed.param_and_grad_buffer": "param/grad buffers on current_device()",
    "megatron.core.optimizer.optimizer": "found_inf / overflow buf / unit scale on device='cuda'",
    "megatron.core.optimizer.clip_grads": "grad-norm accumulators on device='cuda'",
    # dist_checkpointing save/load of model weights (site 6 of the module docstring).
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize() before writing",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "failure flag on current_device()",
    "megatron.core.dist_checkpointing.strategies.torch": "load buffers on current_device()",
    "megatron.core.dist_checkpointing.exchange_utils": "exchange buffers on current_device()",
    # The distributed optimizer's checkpoint paths (site 7 of the module docstring).
    "megatron.core.optimizer.distrib_optimizer": "state gather / dummy load buffers on current_device()",
    # Half-precision students (site 8 of the module docstring).
    "megatron.core.optimizer.grad_scaler": "fp16 loss scale, growth/backoff factors on device='cuda'",
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


_TENSOR_TYPE = torch.Tensor.type


def _tensor_type_as_cuda(
    self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
) -> Any:
    """``Tensor.type()`` that names a CPU tensor as its CUDA twin ("torch.cuda.FloatTensor").

    Only the no-argument form (the type *name*) is changed; a conversion ``t.type(dtype)`` is
    the real one.
    """
    if dtype is None and not kwargs:
        name = _TENSOR_TYPE(self)
        if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
            return "torch.cuda." + name[len("torch.") :]
        return name
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _with_tensor_method(
    method: Callable[..., Any], name: str, replacement: Callable[..., Any]
) -> Callable[..., Any]:
    """Wrap ``method`` so that ``torch.Tensor.<name>`` is ``replacement`` only while it runs."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, replacement)
        try:
            return method(*args, **kwargs)
        finally:
            setattr(torch.Tensor, name, original)

    wrapper._megadistill_cpu_patch = True  # type: ignore[attr-defined]
    return wrapper


def _with_tensor_cuda_as_identity(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``method`` so that ``Tensor.cuda()`` returns the tensor itself while it runs."""
    return _with_tensor_method(method, "cuda", _tensor_cuda_identity)


def _with_tensor_type_as_cuda(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``method`` so that ``Tensor.type()`` names CPU tensors as CUDA ones while it runs."""
    return _with_tensor_method(method, "type", _tensor_type_as_cuda)


def apply() -> None:
    """Apply the CPU patches once per process (idempotent; does nothing when CUDA is available).
    Raises :class:`UnsupportedMegatronVersion` on a megatron-core that is not a supported release
    (``megadistill._compat.SUPPORTED``) unless ``MEGADISTILL_CPU_ANY_MCORE=1``."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    version = _compat.installed_version()
    check_megatron_version(version)
    try:
        cuda_calls = _compat.cpu_cuda_calls(version)
    except ValueError:  # an unparsable version let through by MEGADISTILL_CPU_ANY_MCORE=1: the newest sites
        cuda_calls = _compat.cpu_cuda_calls(_compat.SUPPORTED[-1])

    # Sites 1 and 2: module-local ``torch`` proxies.
    for name in _PROXIED_MODULES:
        module = importlib.import_module(name)
        if module.torch is torch:
            module.torch = _CpuTorch(cuda_calls)

    # Site 6b: not megatron's spawn-context Manager for the write results (module docstring).
    from megadistill.megatron.checkpoint import install_write_results_queue

    install_write_results_queue()

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

    # Site 5: ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers. A CPU fp32
    # tensor is a "torch.FloatTensor": grad clipping would fail its assert and the distributed
    # optimizer would reject every parameter with TypeError.
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    clip = clip_grads.clip_grad_by_total_norm_fp32
    if not getattr(clip, "_megadistill_cpu_patch", False):
        clip = _with_tensor_type_as_cuda(clip)
        clip_grads.clip_grad_by_total_norm_fp32 = clip  # for callers that go through the module
    # The call sites reached in training: optimizer.py imported it by name
    # (MegatronOptimizer.clip_grad_norm, ChainedOptimizer.step).
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = clip

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    build = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]  # a classmethod
    if not getattr(build.__func__, "_megadistill_cpu_patch", False):
        DistributedOptimizer._build_model_and_main_param_groups = classmethod(
            _with_tensor_type_as_cuda(build.__func__)
        )

    # Site 7: the distributed optimizer's 'fully_reshardable' save all-gathers its state shards
    # with ``send_tensor.cuda()`` (the receive buffers go through the proxy).
    method = DistributedOptimizer.get_parameter_state_dp_zero
    if not getattr(method, "_megadistill_cpu_patch", False):
        DistributedOptimizer.get_parameter_state_dp_zero = _with_tensor_cuda_as_identity(method)

    # Site 8: half-precision (bf16/fp16) students. The optimizers sort parameters into 16-bit and
    # fp32 ones by ``param.type()`` in their constructors (a CPU bf16 tensor is a
    # "torch.BFloat16Tensor": Float16OptimizerWithFloat16Params raises TypeError, and the
    # distributed optimizer would give its 16-bit parameters no ``main_param``); the fp16 grad
    # scaler reloads its scale with ``.cuda(current_device())``.
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for klass in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        init = klass.__dict__["__init__"]
        if not getattr(init, "_megadistill_cpu_patch", False):
            klass.__init__ = _with_tensor_type_as_cuda(init)
    method = DynamicGradScaler.load_state_dict
    if not getattr(method, "_megadistill_cpu_patch", False):
        DynamicGradScaler.load_state_dict = _with_tensor_cuda_as_identity(method)

    _applied = True
