"""Input checks run by `fit` before anything is compiled.

    problems = validate.check_datasets(train, eval_, num_outputs=10, classification=True,
                                       batch_size=128, last_batch="drop")

Each check names the argument, what was expected and what was received, and says how to fix
it. Errors raise `DataError` (a ValueError); soft problems (e.g. uint8 images that reach the
model unscaled) are returned as warnings. Sources with an `arrays` dict (`ArraySource`) are
checked in full; any other random-access source is checked on its first `SAMPLE` examples.
"""

import functools

import numpy as np

from dlkit.data import sources

SAMPLE = 4096


class DataError(ValueError):
    """A dataset that a run cannot use as given."""


def _arrays(source) -> dict[str, np.ndarray]:
    if hasattr(source, "arrays"):
        return source.arrays
    n = min(len(source), SAMPLE)
    return sources.get_batch(source, np.arange(n))


def _first_bad(mask: np.ndarray) -> int:
    return int(np.argmax(mask.reshape(mask.shape[0], -1).any(axis=1)))


def _token_ids(source, x: np.ndarray, y: np.ndarray) -> bool:
    """Integer inputs that index a vocabulary (a language model's tokens), not pixel values:
    the source has a vocabulary, or the labels are next-token ids shaped like the inputs."""
    if getattr(source, "vocab_size", None) is not None or hasattr(source, "vocab"):
        return True
    return x.ndim == 2 and y.shape == x.shape and np.issubdtype(y.dtype, np.integer)


def check_split(source, split: str, *, num_outputs: int | None, classification: bool) -> list[str]:
    """Checks one split; returns warnings, raises DataError on errors."""
    warnings = []
    n = len(source)
    if n == 0:
        raise DataError(
            f"data ({split} split): expected at least one example, got an empty "
            "dataset (0 examples)"
        )
    arrays = _arrays(source)
    for key in ("inputs", "labels"):
        if key not in arrays:
            raise DataError(
                f"data ({split} split): expected examples with keys 'inputs' and 'labels', "
                f"got keys {sorted(arrays)}"
            )
    x, y = np.asarray(arrays["inputs"]), np.asarray(arrays["labels"])

    # Inputs: layout, scale, finiteness.
    if x.ndim < 2:
        raise DataError(
            f"inputs ({split} split): expected a batch axis and a feature axis, shape (N, F) "
            f"(or (N, H, W, C) images, (N, T) tokens), got shape {x.shape}; a single feature "
            "per example is x[:, None]"
        )
    if x.ndim == 4 and x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"inputs ({split} split): expected channels-last images (N, H, W, C), got shape "
            f"{x.shape}, which looks channels-first (N, C, H, W); use "
            f"np.transpose(x, (0, 2, 3, 1))"
        )
    if np.issubdtype(x.dtype, np.integer) and not _token_ids(source, x, y):
        warnings.append(
            f"inputs ({split} split): expected floats scaled to about [0, 1], got {x.dtype} "
            f"values in [{x.min()}, {x.max()}] that reach the model unscaled; divide by "
            f"{np.iinfo(x.dtype).max if x.dtype == np.uint8 else 'their range'}"
        )
    elif np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x)
        if not finite.all():
            bad = ~finite
            raise DataError(
                f"inputs ({split} split): expected finite values, got {int(bad.sum())} NaN/Inf "
                f"values in {int(bad.reshape(len(x), -1).any(axis=1).sum())} examples, the "
                f"first at index {_first_bad(bad)}"
            )
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if x.ndim >= 3 and lo >= 0 and 2 < hi <= 255:  # images still in pixel units
            warnings.append(
                f"inputs ({split} split): expected floats scaled to about [0, 1], got {x.dtype} "
                f"images with values in [{lo:g}, {hi:g}] that reach the model unscaled; "
                "divide by 255"
            )

    # Labels: type, shape, range.
    if classification:
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"labels ({split} split): expected integer class ids, got dtype {y.dtype} "
                f"(e.g. {y.reshape(-1)[0]!r}); convert with labels.astype(np.int32)"
            )
        if y.ndim == 2 and y.shape[1] == 1:
            raise DataError(
                f"labels ({split} split): expected shape (N,), got {y.shape}; squeeze the last "
                "axis with labels[:, 0]"
            )
        if y.shape[0] != x.shape[0]:
            raise DataError(
                f"labels ({split} split): expected {x.shape[0]} labels (one per input), got "
                f"{y.shape[0]}"
            )
        if callable(num_outputs):
            num_outputs = num_outputs()
        if num_outputs is not None and y.size:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_outputs:
                bad_value = lo if lo < 0 else hi
                index = int(np.argmax(y.reshape(-1) == bad_value))
                raise DataError(
                    f"labels ({split} split): expected class ids in [0, {num_outputs}) for a "
                    f"model with {num_outputs} outputs, got {bad_value} (index {index}); "
                    f"set model.num_classes or fix the labels"
                )
    return warnings


def check_datasets(
    train_source,
    eval_source,
    *,
    num_outputs,
    classification: bool,
    batch_size: int,
    last_batch: str,
) -> list[str]:
    """Checks both splits and how they fit the run; returns warnings, raises DataError.

    `num_outputs`: the model's output size, or a callable returning it (see `check_split`).
    """
    if callable(num_outputs):
        num_outputs = functools.cache(num_outputs)  # inferred once, for both splits
    warnings = check_split(
        train_source, "train", num_outputs=num_outputs, classification=classification
    )
    warnings += check_split(
        eval_source, "eval", num_outputs=num_outputs, classification=classification
    )
    # A sample of a larger dataset (`grain_pipeline.Sample`) is judged by the whole dataset.
    n_train = getattr(train_source, "num_source_examples", len(train_source))
    if last_batch == "drop" and batch_size > n_train:
        raise DataError(
            f"train.batch_size: expected at most the {n_train} training examples "
            f"with data.last_batch=drop (else every batch is dropped), got {batch_size}"
        )
    x_train = sources.get_batch(train_source, np.array([0]))["inputs"]
    x_eval = sources.get_batch(eval_source, np.array([0]))["inputs"]
    if x_train.shape[1:] != x_eval.shape[1:]:
        raise DataError(
            f"inputs (eval split): expected examples of shape {x_train.shape[1:]} as in the "
            f"train split, got {x_eval.shape[1:]}"
        )
    return warnings
