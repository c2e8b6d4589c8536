"""Every random stream of a run is derived from ``(seed, step, ...)`` here, never from a running generator,
so a run resumed from a checkpoint replays exactly the batches and directions it would have seen."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (run seed, step, query, layer): stateless, so resume is exact."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(a) << 30) ^ int(b)
