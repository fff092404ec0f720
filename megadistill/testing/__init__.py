"""CPU/gloo test harness. Test-only: no production module imports this package."""

from megadistill.testing.distributed import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
