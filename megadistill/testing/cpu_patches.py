"""Test-only patch set letting megatron-core run on a CPU-only torch with gloo (placeholder, being written)."""

_applied = False


def apply() -> None:
    """Apply the CPU patches once per process (idempotent)."""
    global _applied
    _applied = True
