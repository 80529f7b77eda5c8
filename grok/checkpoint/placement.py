"""Host leaves -> sharded device arrays, one leaf at a time: for checkpoints whose files are not
in the leaf table's layout (Grok-2's release: transposed, experts split by rank). A leaf is an
array or anything indexed like one (grok.checkpoint.grok2_release.LazyLeaf: views of the files
that read only what a slice needs); each process takes only the slices its own devices hold; a
stacked [L, ...] leaf is filled layer by layer in place on the devices, so host memory holds at
most one leaf's slices at a time (Grok-2's largest leaf: 2.1 GB). Given the shardings, it never
imports grok.parallel (as grok.checkpoint.loader)."""
from __future__ import annotations

from typing import Any, Iterable

import ml_dtypes
import numpy as np

from grok.checkpoint import transfer
from grok.checkpoint.arrays import leaf_parts
from grok.checkpoint.targets import assemble, plan_targets
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.leaves import Entry


def place_leaves(leaves: Iterable[tuple[Entry, Any]], config: GrokConfig, shardings: Any,
                 scan: bool = True) -> dict[str, Any]:
    """The params tree on the devices `shardings` (the tree grok.parallel.rules makes) names,
    from (entry, host leaf) pairs covering the leaf table once each, in any order."""
    targets, per_file = plan_targets(config, shardings, scan, np.dtype(ml_dtypes.bfloat16))
    feeds = {entry.name: targets_of for entry, targets_of in per_file}
    for entry, leaf in leaves:
        parts = leaf_parts(leaf)
        for target in feeds.pop(entry.name):
            host = parts[target.part]   # (an array, or a view that reads what is indexed)
            sharding = target.piece_sharding if target.stacked else target.sharding
            local = {key: np.ascontiguousarray(np.asarray(host[index], target.dtype))
                     for key, index in transfer.local_indices(sharding, host.shape).items()}
            array, _ = transfer.device_array(host.shape, sharding, local)
            if not target.stacked:
                target.array = array
                continue
            if target.array is None:
                target.array = transfer.zeros((config.num_layers, *host.shape), target.dtype,
                                              target.sharding)
            target.array = transfer.put_layer(target.array, array, entry.layer)
    if feeds:
        raise CheckpointError(f"no weights for leaf {next(iter(feeds))} ({len(feeds)} missing)")
    return assemble(config, targets, scan)
