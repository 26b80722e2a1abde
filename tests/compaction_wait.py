"""Waiting for a running writer's compaction through its public face (``writer.stats()``)."""

from __future__ import annotations

import time


def wait_for_compaction(writer, timeout: float = 120.0) -> None:
    """Wait until every whole chunk of the rows ``writer`` committed is compacted into the main tier
    (call ``writer.flush()`` first), so that a store has both tiers in use."""
    deadline = time.monotonic() + timeout
    while writer.stats().hot_rows >= writer.chunk_rows:
        if time.monotonic() > deadline:
            raise TimeoutError(f"compaction did not catch up in {timeout} s: {writer.stats()}")
        time.sleep(0.005)
