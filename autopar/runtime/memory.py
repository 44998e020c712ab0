"""Host memory of this process, for the measured side of the plan report on CPU ranks.

There is no allocator high-water mark for CPU tensors the way ``torch.cuda.max_memory_allocated``
gives one on GPU, so a CPU rank reports how far its peak resident set grew past the resident set it
had when it was compiled: an upper bound on what training added (the model's parameters, gradients,
optimizer state, activations, communication buffers), which can also include allocator caching
and whatever else the process did meanwhile.
"""

from __future__ import annotations

import os
import resource
import sys


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """The process's resident set size now (``/proc/self/statm``; the peak where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


__all__ = ["current_rss_bytes", "peak_rss_bytes"]
