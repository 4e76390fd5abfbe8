"""Your own arrays as a dataset: `data.name=arrays` with `data.path` one of

- FILE.npz holding `x_train`, `y_train`, `x_test`, `y_test` (the layout of the `keras.datasets`
  npz files, e.g. mnist.npz), read into memory;
- a directory holding `x_train.npy`, `y_train.npy`, `x_test.npy`, `y_test.npy`, opened
  memory-mapped (`np.load(mmap_mode="r")`), so arrays larger than memory train batch by batch.

    dlkit train digits_mlp --set data.name=arrays --set data.path=mnist.npz \\
        --set model.options.num_classes=10

Images (N, H, W) get a channel axis, (N, H, W, 1). Scaling is `data.scale`: "uint8" (the
default) divides uint8 inputs by 255 into float32 in [0, 1] as each batch is read (other
dtypes pass unchanged); "none" passes every input as stored. Labels are cast to int32.
"""

import os

import numpy as np

from dlkit.data import sources

_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
SCALES = ("uint8", "none")


class ScaledSource:
    """An ArraySource whose uint8 inputs are divided by 255 (float32) as they are read."""

    def __init__(self, source: sources.ArraySource):
        self.source = source

    def __len__(self):
        return len(self.source)

    @staticmethod
    def _scale(example):
        return {**example, "inputs": example["inputs"].astype(np.float32) / np.float32(255)}

    def __getitem__(self, i):
        return self._scale(self.source[i])

    def get_batch(self, indices):
        return self._scale(self.source.get_batch(indices))

    @property
    def element_spec(self):
        spec = dict(self.source.element_spec)
        spec["inputs"] = (spec["inputs"][0], np.dtype(np.float32))
        return spec


def _read(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    x_key, y_key = _KEYS[split]
    if os.path.isdir(path):
        files = [os.path.join(path, f"{k}.npy") for k in (x_key, y_key)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"data.path: expected {x_key}.npy and {y_key}.npy in {path}, got no {missing}"
            )
        return tuple(np.load(f, mmap_mode="r", allow_pickle=False) for f in files)
    if not path.endswith(".npz"):
        raise ValueError(
            f"data.path: expected FILE.npz or a directory of .npy files for data.name=arrays, "
            f"got {path!r}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path: expected an existing .npz file, got {path!r}")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in (x_key, y_key) if k not in npz.files]
        if missing:
            raise ValueError(
                f"data.path: expected arrays x_train, y_train, x_test, y_test in {path} "
                f"(the keras.datasets layout), got {sorted(npz.files)}"
            )
        return npz[x_key], npz[y_key]


def load_arrays(path: str, split: str, *, scale: str = "uint8"):
    """The `split` ("train" or "test") of the arrays at `path` as a source of float32 (or
    stored-dtype) "inputs" and int32 "labels"; see the module docstring."""
    if scale not in SCALES:
        raise ValueError(f"data.scale: expected one of {SCALES}, got {scale!r}")
    if not path:
        raise ValueError("data.path: expected FILE.npz or a .npy directory for data.name=arrays")
    x, y = _read(path, split)
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[..., None]
    if len(x) != len(y):
        raise ValueError(
            f"data.path: expected as many labels as inputs in {path} ({split}), got "
            f"{len(x)} inputs and {len(y)} labels"
        )
    if y.dtype != np.int32 and np.issubdtype(y.dtype, np.integer):
        y = np.asarray(y, np.int32)
    source = sources.ArraySource(inputs=x, labels=y)
    return ScaledSource(source) if scale == "uint8" and x.dtype == np.uint8 else source
