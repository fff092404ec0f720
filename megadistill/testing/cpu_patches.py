"""The CPU patch set for megatron-core, under its historical test-harness name.

The patches live in :mod:`megadistill.megatron.cpu` (the training driver applies them on machines
without CUDA); this name is the very same module object, so tests may inspect its internals.
"""

import sys

from megadistill.megatron import cpu as _cpu

sys.modules[__name__] = _cpu
