"""CPU/gloo test harness. Test-only: no production module imports this package."""

from megadistill.testing.distributed import CPU_ONLY_ENV, cuda_hidden, free_port, hide_cuda, run_distributed

__all__ = ["CPU_ONLY_ENV", "cuda_hidden", "free_port", "hide_cuda", "run_distributed"]
