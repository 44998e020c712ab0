"""Suite-wide settings: measurements autopar caches on disk (profiled planning) go to a directory of
this test session, so a run never reads a developer's cache nor leaves one behind."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("AUTOPAR_CACHE", tempfile.mkdtemp(prefix="autopar-test-cache-"))
