"""dlkit.data: datasets, deterministic resumable loaders and background prefetching.

Usage::

    import jax
    import dlkit.data as data

    train = data.load_dataset("digits", "train")        # ArraySource: inputs, labels
    info = data.dataset_info("digits")                  # {'num_classes': 10, ...}
    loader = data.Loader(train, batch_size=32, seed=0, position=0)
    with data.prefetch(loader, put=jax.device_put, size=2) as batches:
        for step, batch in zip(range(1000), batches):  # batch: inputs, labels, mask
            ...
    # checkpoint {"position": steps_consumed}, then resume with Loader(..., position=...)

    test = data.load_dataset("digits", "test")
    for batch in data.Loader(test, 100, shuffle=False, last_batch="pad").iter_epoch(0):
        ...                                             # weight per-example results by mask
"""

from dlkit.data.datasets import (
    DATASETS,
    available_datasets,
    dataset_info,
    load_dataset,
    read_idx,
)
from dlkit.data.loader import Loader, stacked
from dlkit.data.prefetch import Prefetcher, prefetch
from dlkit.data.sources import (
    ArraySource,
    Subset,
    get_batch,
)

__all__ = [
    "DATASETS",
    "ArraySource",
    "Loader",
    "Prefetcher",
    "Subset",
    "available_datasets",
    "dataset_info",
    "get_batch",
    "load_dataset",
    "prefetch",
    "read_idx",
    "stacked",
]
