import os

# Import Megatron-core once in the pytest parent: forked ranks then start in well under a second.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import megatron.core.parallel_state  # noqa: E402,F401
import megatron.core.tensor_parallel  # noqa: E402,F401
