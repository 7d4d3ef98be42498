"""Guards shared by all tensor maths and its callers: float32's largest finite value, the NaN/Inf
refusal before maths that would fail on such values or spread them, and a context that runs torch's
CPU ops on one thread for the many small tensors of adapter work. No I/O.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



F32_MAX = 3.4028234663852886e38


@contextlib.contextmanager
def single_threaded(active: bool = True) -> Iterator[None]:
    """Run torch's CPU ops in this thread on one intra-op thread, restoring the setting after.

    Adapter work is many operations on small tensors ((out+in)×r factors, r×r cores, row copies):
    too small for an OpenMP team to pay off, and on a busy machine a descheduled team member makes
    every operation wait at its barrier, 10-3000× slower (measured on 2 cores at load 4-12: combine's
    two r16 adapters 33 s instead of 2.3 s; one torch.cat 80 ms instead of 0.03 ms; the value
    checks before writing a full-size FLUX.1 LoRA 35 s instead of well under one). Dense
    decompositions and merge's big products keep every thread.
    """
    import torch

    before = torch.get_num_threads()
    if active and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def require_finite(name: str, where: str, **tensors: torch.Tensor) -> None:
    """Refuse NaN/Inf in a module's factors before maths that would fail on them or spread them.

    Raises:
        IncompatibleError: naming the module and the factor.
    """
    import torch

    from loratool.errors import IncompatibleError

    for role, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IncompatibleError(f"{where}: module '{name}': {role} holds NaN or Inf values",
                                    hint="check the adapter with: loratool validate ADAPTER")
