"""Named token sets (``trained``, ``untrained``): from a corpus's token ids or the notebook's mask file.

Part of the library, not the trainer: ``wordystore import --token-masks`` reads the mask file
without transformers or tokenizers installed.

    >>> sets = token_sets_from_ids(np.array([3, 1, 3]), vocab_size=5)
    >>> sets["trained"].tolist(), sets["untrained"].tolist()
    ([1, 3], [0, 2, 4])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wordystore.format.keys import token_set_problem


def token_sets_from_ids(ids: np.ndarray, vocab_size: int) -> dict[str, np.ndarray]:
    """``trained``: the ids that occur in the corpus; ``untrained``: the rest of the vocabulary."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"corpus has token id {int(ids.max())} outside the vocabulary of {vocab_size}")
    present = np.zeros(vocab_size, dtype=bool)
    present[ids] = True
    return {"trained": np.flatnonzero(present), "untrained": np.flatnonzero(~present)}


def token_sets_from_mask_file(path: str | Path, vocab_size: int) -> dict[str, np.ndarray]:
    """Token sets from the notebook's mask file (``trained_indices``, ``untrained_indices``, or the masks)."""
    from safetensors.numpy import load_file

    data = load_file(str(path))
    sets = {}
    for name in ("trained", "untrained"):
        if f"{name}_indices" in data:
            sets[name] = np.sort(data[f"{name}_indices"].astype(np.int64))
        elif f"{name}_mask" in data:
            sets[name] = np.flatnonzero(data[f"{name}_mask"].astype(bool))
        else:
            raise ValueError(f"{path}: no '{name}_indices' or '{name}_mask' tensor; found {sorted(data)}")
        problem = token_set_problem(sets[name], vocab_size)
        if problem:
            raise ValueError(f"{path}: token set '{name}' is not one: {problem}")
    return sets
