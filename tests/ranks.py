"""Ending a rank spawned by ``torch.multiprocessing.spawn`` in the gloo tests that use DDP.

``DistributedDataParallel`` keeps its process group alive after ``destroy_process_group``
(in torch 2.13 it is not freed), so gloo's worker threads outlive the test. One of them may
still be releasing the last collective's tensors when the interpreter finalizes; releasing
a tensor that Python owns takes the GIL, and a thread taking the GIL during finalization is
unwound through a ``noexcept`` destructor: ``terminate called without an active
exception``, SIGABRT, and a rank that passed reports a failure (about 1 run in 20 on a
2-core machine; pytorch/pytorch#179291 describes the same). A rank that passed and left
its process group therefore exits here, without finalizing; a rank that failed raises as
usual, so ``spawn`` reports its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_passed_rank() -> NoReturn:
    """Exit status 0 at once: flush what the rank printed, skip interpreter finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
