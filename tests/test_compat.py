"""megadistill._compat: the installed megatron-core version, the supported releases, and the
per-version facts the rest of the package asks it for (the CPU layer's CUDA calls, the checkpoint
format). The same assertions hold on every supported release: `make test` (0.16.1) and
`make test MCORE=0.19.2` both run them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from megadistill import _compat


def test_versions_parse_with_or_without_patch_and_local_suffix():
    assert _compat.parse("0.16.1") == (0, 16, 1)
    assert _compat.parse("0.19.2+853ecc7") == (0, 19, 2)  # 0.19 appends the sha of a git work tree
    assert _compat.parse("0.19") == (0, 19, 0)
    assert _compat.parse("0.20.0rc1") == (0, 20, 0)
    assert _compat.minor("0.19.2") == "0.19"
    with pytest.raises(ValueError, match="'dev' is not of the form MAJOR.MINOR"):
        _compat.parse("dev")


def test_supported_releases_and_what_is_refused():
    assert _compat.SUPPORTED == ("0.16", "0.19")
    for version in ("0.16.0", "0.16.1", "0.19.0", "0.19.2", "0.19.2+853ecc7"):
        assert _compat.is_supported(version) and _compat.unsupported_message(version, "x") is None
    for version in ("0.15.3", "0.17.0", "0.18.1", "0.20.0", "1.0.0", "garbage"):
        assert not _compat.is_supported(version)
    message = _compat.unsupported_message("0.20.0", "megadistill's CPU layer")
    assert message == "megadistill's CPU layer supports megatron-core 0.16.x or 0.19.x, but megatron-core 0.20.0 is installed"
    assert "0.17/0.18 are expected to work but untested" in _compat.unsupported_message("0.18.0", "x")
    assert "\n" not in message


def test_the_installed_version_is_read_without_importing_megatron_core():
    """In a fresh interpreter: the version, and megatron.core still not imported (0.19's package
    __init__ loads most of the library, triton included)."""
    code = textwrap.dedent(
        """
        import sys
        from megadistill import _compat
        print(_compat.installed_version())
        print(sorted(m for m in sys.modules if m.startswith("megatron")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    version, imported = out[0], out[1]
    assert imported == "[]"
    from megatron.core import package_info

    assert package_info.__version__.split("+")[0] == version  # the same answer as the imported package
    assert _compat.installed_version() == version  # and after the import: constants, not __version__
    assert _compat.is_supported(version)


def test_cuda_calls_the_cpu_layer_answers_per_version():
    base = {"current_device", "synchronize", "get_rng_state", "manual_seed"}
    assert _compat.cpu_cuda_calls("0.16.1") == base  # 0.16's DDP never asks for a stream
    assert _compat.cpu_cuda_calls("0.19.2") == base | {"current_stream", "default_stream"}


def test_the_cpu_layer_gives_0_19_a_stream_and_leaves_0_16_failing_loudly():
    """0.19's DDP start_grad_sync calls torch.cuda.current_stream() on every gradient sync (the
    whole Megatron training suite fails on 0.19 without the stand-in); on 0.16 the call is the
    real one, which on a CPU-only torch raises."""
    import torch

    from megadistill.megatron import cpu

    cuda19 = cpu._CpuTorch(_compat.cpu_cuda_calls("0.19.2")).cuda
    stream = cuda19.current_stream()
    assert stream is cuda19.default_stream() is cpu._CPU_STREAM
    stream.wait_event(object())  # no-ops: CPU work is complete when it returns
    stream.wait_stream(stream)
    assert cuda19.current_device() == torch.device("cpu")
    cuda16 = cpu._CpuTorch(_compat.cpu_cuda_calls("0.16.1")).cuda
    assert cuda16.current_stream is torch.cuda.current_stream  # not redirected
    assert cuda16.current_device() == torch.device("cpu")
    with pytest.raises(AttributeError):  # a call set naming a function with no stand-in is a defect
        cpu._CpuCuda(frozenset({"mem_get_info"}))


def test_checkpoint_format_facts():
    assert _compat.writes_common_pt("0.16.1") and not _compat.reads_checkpoint_without_common_pt("0.16.1")
    assert not _compat.writes_common_pt("0.19.2") and _compat.reads_checkpoint_without_common_pt("0.19.2")
    assert _compat.forks_checkpoint_writers("0.16.1") and not _compat.forks_checkpoint_writers("0.19.2")


def test_quiet_known_messages_drops_exactly_the_known_notices(caplog):
    import logging
    import warnings

    with warnings.catch_warnings():  # the warnings filter it adds stays inside this test
        _compat.quiet_known_messages()
        _compat.quiet_known_messages()  # idempotent: one filter per logger
    loggers = [logging.getLogger(name) for name in _compat._KNOWN_MESSAGES]
    try:
        _check_the_filters(caplog)
    finally:  # the loggers as other tests expect them
        for logger in loggers:
            for f in [f for f in logger.filters if isinstance(f, _compat._DropKnownMessage)]:
                logger.removeFilter(f)


def _check_the_filters(caplog):
    import logging
    import warnings

    ddp = logging.getLogger("megatron.core.distributed.distributed_data_parallel")
    assert sum(isinstance(f, _compat._DropKnownMessage) for f in ddp.filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED. GPTModel is only ...")
        ddp.warning("DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True.")
        logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning("MCore's async save is deprecated")
        logging.getLogger("megatron.core.dist_checkpointing.strategies.common").warning("load_common is deprecated and ...")
        ddp.warning("a real problem")  # the same logger, another message: kept
        logging.getLogger("megatron.core.other").warning("GPTModel IS DEPRECATED")  # another logger: kept
    assert [r.getMessage() for r in caplog.records] == ["a real problem", "GPTModel IS DEPRECATED"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _compat.quiet_known_messages()  # its warnings filter goes in front of "default"
        warnings.warn("MimoModelConfig is experimental and still under active development.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in caught] == ["something else"]
