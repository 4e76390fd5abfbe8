"""Which dataset reads which `data.*` setting, and the check that no setting is ignored.

A setting changed from its default for a dataset that never reads it would silently train on
other data, or with other shapes, than the user asked for (e.g. `data.path` with
`data.name=kjv`), so `DataConfig.check` makes it an error before anything is built.
"""

from __future__ import annotations

from dlkit import errors

# The datasets that read each setting (dlkit.data.datasets.load_dataset).
READERS = {
    "path": ("text", "arrays", "arrayrecord", "bpe_corpus"),
    "data_dir": ("fashion_mnist", "kjv", "spoken_digits"),
    "seq_len": ("text", "kjv", "bpe_corpus"),
    "scale": ("arrays",),
}
_HINTS = {
    "path": (
        "set data.name=text for a text file, data.name=arrays for .npz/.npy arrays, "
        "data.name=arrayrecord for a directory of ArrayRecord files, data.name=bpe_corpus for "
        "a directory written by `python -m dlkit.data.tokenize_corpus`"
    ),
    "data_dir": "data.path names the file for data.name=text or arrays",
    "seq_len": "only text and token corpora are cut into windows",
    "scale": "only data.name=arrays scales its inputs",
}


def check_read(data, defaults) -> None:
    """Raises on the first dataset setting of `data` (a DataConfig) that differs from
    `defaults` and that `data.name` does not read.

    Raises:
      ConfigError: naming the setting, its value, the dataset and the settings it reads.
    """
    for key, readers in READERS.items():
        value = getattr(data, key)
        if value == getattr(defaults, key) or data.name in readers:
            continue
        read = [f"data.{k}" for k, names in READERS.items() if data.name in names]
        raise errors.ConfigError(
            f"data.{key}: read only with data.name={' or '.join(readers)}; got "
            f"data.{key}={value!r} with data.name={data.name!r}, which ignores it and reads "
            f"{', '.join(read) or 'none of data.path, data.data_dir, data.seq_len, data.scale'} "
            f"({_HINTS[key]})"
        )


def check_grain(data, defaults) -> None:
    """The `data.grain_*` settings of a `DataConfig`: in range, and set only with
    data.pipeline=grain (`defaults`: a default DataConfig)."""
    if data.grain_workers < 0:
        raise errors.ConfigError(
            f"data.grain_workers: expected an int >= 0 (0 = no worker processes), got "
            f"{data.grain_workers}"
        )
    if data.grain_worker_buffer < 1:
        raise errors.ConfigError(
            f"data.grain_worker_buffer: expected an int >= 1, got {data.grain_worker_buffer}"
        )
    for key in ("grain_read_threads", "grain_read_buffer"):
        if getattr(data, key) < 0:
            raise errors.ConfigError(
                f"data.{key}: expected an int >= 0 (0 = read in the thread that asks for the "
                f"batch), got {getattr(data, key)}"
            )
    if data.pipeline == "grain":
        if data.last_batch != "drop":
            raise errors.ConfigError(
                f"data.last_batch: expected 'drop' with data.pipeline=grain (it trains on "
                f"whole batches only), got {data.last_batch!r}"
            )
        return
    for key in ("grain_workers", "grain_worker_buffer", "grain_read_threads", "grain_read_buffer"):
        if getattr(data, key) != getattr(defaults, key):
            raise errors.ConfigError(
                f"data.{key}: read only with data.pipeline=grain; got data.{key}="
                f"{getattr(data, key)!r} with data.pipeline={data.pipeline!r}, which "
                "ignores it (add --set data.pipeline=grain)"
            )
