"""Data audit: duplicates, train/eval leakage, conflicting labels, balance, NaN/Inf, ranges.

    from dlkit.data import audit, datasets
    report = audit.audit_datasets(datasets.load_dataset("fashion_mnist", "train"),
                                  datasets.load_dataset("fashion_mnist", "test"))
    print(report.format())          # readable summary with counts and example indices
    report.to_dict()                # JSON-ready (what `dlkit audit --json` and audit.json hold)
    [i.check for i in report.issues if i.severity == "error"]   # e.g. ["leakage"]

`dlkit.data.validate` does the cheap checks that make a run impossible (shapes, label range,
NaN/Inf); this module looks for what makes a run *misleading*: the same example twice in a
split, test examples that are also training examples (leakage), identical inputs with different
labels, class imbalance, constant features, and value ranges. `fit` runs it before compiling,
governed by `data.audit` (warn | fail | off): "fail" raises a `DataError` when an issue of
severity "error" is found (leakage, conflicting labels, NaN/Inf); "warn" logs one line.

Exact duplicates are found by hashing each example's raw bytes (blake2b, 16 bytes, one call per
row) and grouping equal hashes with `np.unique`; equal hashes are then confirmed by comparing
the bytes, so a hash collision can never be reported as a duplicate. Fashion-MNIST's 70,000
examples take about a second. Above `max_examples` per split, a seeded random sample of that
many examples is audited and the report says so (counts are then of the sample).

Token-sequence datasets (integer inputs whose labels have the inputs' shape, e.g. the
character LM's next-token targets) skip what does not apply to them (class balance, conflicting
labels, constant features, NaN/Inf) and the report lists what was skipped; what is left (exact
duplicate windows within a split and between the splits, token ranges) is checked on a random
sample of at most `MAX_TOKEN_EXAMPLES` windows per split, as a text has a window at every
character.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
from etils import epath

from dlkit import finite_json
from dlkit.data import sources
from dlkit.data.validate import DataError

SEVERITIES = ("error", "warning", "info")
MAX_EXAMPLES = 200_000  # per split; above it a seeded random sample is audited
MAX_TOKEN_EXAMPLES = 10_000  # the same for token sequences (a text has millions of windows)
NUM_EXAMPLES_SHOWN = 5  # example indices kept per issue
IMBALANCE_WARN_RATIO = 1.5  # largest / smallest class count above which balance is a warning
_CHUNK = 4096  # examples gathered at once from sources without `arrays`


@dataclasses.dataclass
class Issue:
    """One finding.

    Attributes:
      check: what found it: duplicates | leakage | conflicting_labels | nonfinite |
        constant_features | class_imbalance.
      severity: error (the run's numbers cannot be trusted: leakage, conflicting labels,
        NaN/Inf, every feature constant) | warning (duplicates, imbalance) | info (some
        constant features).
      split: "train", "eval", or "train+eval" for findings across the splits.
      message: one readable line with the counts.
      count: how many examples (or features) are affected.
      examples: a few example indices; groups of equal examples as lists, leakage as
        {"eval": i, "train": j} pairs, features as flat feature indices.
    """

    check: str
    severity: str
    split: str
    message: str
    count: int
    examples: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class AuditReport:
    """What `audit_datasets` found.

    Attributes:
      issues: the findings, errors first.
      stats: per split: {"num_examples", "num_audited", "class_counts", "imbalance_ratio",
        "min", "max", "mean", "std", "nonfinite_values", "constant_features", ...}.
      skipped: checks that do not apply to these data, with the reason.
    """

    issues: list[Issue]
    stats: dict[str, dict[str, Any]]
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def find(self, check: str, split: str | None = None) -> Issue | None:
        """The issue of `check` (and `split`), or None."""
        for issue in self.issues:
            if issue.check == check and (split is None or issue.split == split):
                return issue
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "issues": [dataclasses.asdict(i) for i in self.issues],
            "stats": self.stats,
            "skipped": list(self.skipped),
        }

    def summary(self) -> str:
        """One line: the issue counts by severity and the checks that found them."""
        if not self.issues:
            return "data audit: no issues"
        parts = []
        for severity in SEVERITIES:
            found = [i for i in self.issues if i.severity == severity]
            if found:
                checks = ", ".join(f"{i.check}[{i.split}]={i.count}" for i in found)
                parts.append(f"{len(found)} {severity}(s) ({checks})")
        return "data audit: " + "; ".join(parts)

    def format(self) -> str:
        """The whole report as readable text."""
        lines = [self.summary(), ""]
        for split, s in self.stats.items():
            sampled = (
                f" (a random sample of {s['num_audited']})"
                if s["num_audited"] < s["num_examples"]
                else ""
            )
            lines.append(f"{split}: {s['num_examples']} examples{sampled}")
            if "min" in s:
                lines.append(
                    f"  values: min {s['min']:.4g}  max {s['max']:.4g}  mean {s['mean']:.4g}  "
                    f"std {s['std']:.4g}"
                )
            if "class_counts" in s:
                lines.append(
                    f"  classes: {s['class_counts']}  imbalance (max/min) "
                    f"{s['imbalance_ratio']:.3g}"
                )
        if self.issues:
            lines += ["", "issues:"]
            for i in self.issues:
                lines.append(f"  [{i.severity}] {i.message}")
                if i.examples:
                    lines.append(f"      e.g. {json.dumps(i.examples)}")
        if self.skipped:
            lines += ["", "skipped:"] + [f"  {s}" for s in self.skipped]
        return "\n".join(lines)

    def write(self, path: str | epath.PathLike) -> epath.Path:
        """Writes `to_dict()` as JSON to `path` (a local path or a `gs://` URL); returns it."""
        path = epath.Path(path)
        path.write_text(finite_json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _gather(source, max_examples: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(arrays, indices): the audited examples and their indices in `source`."""
    n = len(source)
    if n > max_examples:
        indices = np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False))
    else:
        indices = np.arange(n)
    if hasattr(source, "arrays"):
        arrays = source.arrays
        if len(indices) == n:
            return {k: np.asarray(v) for k, v in arrays.items()}, indices
        return {k: np.asarray(v[indices]) for k, v in arrays.items()}, indices
    chunks = [
        sources.get_batch(source, indices[i : i + _CHUNK]) for i in range(0, len(indices), _CHUNK)
    ]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, indices


def _row_bytes(x: np.ndarray) -> np.ndarray:
    """(N, D) uint8: each example's raw bytes, one row per example."""
    x = np.ascontiguousarray(x)
    return x.reshape(len(x), -1).view(np.uint8).reshape(len(x), -1)


def _hashes(rows: np.ndarray) -> np.ndarray:
    """(N,) 16-byte digests (numpy void) of the rows of `rows` (N, D) uint8."""
    digests = b"".join(hashlib.blake2b(row.data, digest_size=16).digest() for row in rows)
    return np.frombuffer(digests, dtype="V16")


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Index groups (sorted, size >= 2) of equal entries of `keys` (N,)."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(counts)[:-1]
    return [g for g in np.split(order, bounds) if len(g) > 1]


def _exact(groups: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    """Splits hash groups by the actual bytes (a collision never counts as a duplicate)."""
    out = []
    for g in groups:
        if np.all(rows[g] == rows[g[0]], axis=1).all():
            out.append(g)
            continue
        by_bytes: dict[bytes, list[int]] = {}  # a hash collision: regroup by the bytes
        for i in g:
            by_bytes.setdefault(rows[i].tobytes(), []).append(int(i))
        out += [np.array(sub) for sub in by_bytes.values() if len(sub) > 1]
    return out


def _is_token_sequences(x: np.ndarray, y: np.ndarray | None) -> bool:
    return (
        np.issubdtype(x.dtype, np.integer)
        and y is not None
        and x.ndim == 2
        and np.shape(y) == x.shape
    )


def _is_class_labels(y: np.ndarray | None, n: int) -> bool:
    return y is not None and np.issubdtype(y.dtype, np.integer) and y.shape == (n,)


def _split_stats(x: np.ndarray, y, n_total: int, token_sequences: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"num_examples": n_total, "num_audited": len(x)}
    flat = x.reshape(len(x), -1)
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(flat)
        s["nonfinite_values"] = int((~finite).sum())
        s["nan_values"] = int(np.isnan(flat).sum())
        values = flat if finite.all() else flat[finite]
    else:
        values = flat
    if values.size:
        s["min"], s["max"] = float(values.min()), float(values.max())
        s["mean"], s["std"] = float(values.mean(dtype=np.float64)), float(values.std())
    if not token_sequences and _is_class_labels(y, len(x)) and len(y):
        counts = np.bincount(y - min(int(y.min()), 0))
        s["class_counts"] = {int(c): int(k) for c, k in enumerate(counts)}
        present = counts[counts > 0]
        s["imbalance_ratio"] = float(present.max() / present.min()) if len(present) else 1.0
        s["classes_missing"] = [int(c) for c in np.flatnonzero(counts == 0)]
    return s


def _index_list(indices: np.ndarray, k: int = NUM_EXAMPLES_SHOWN) -> list[int]:
    return [int(i) for i in indices[:k]]


def audit_datasets(
    train_source,
    eval_source=None,
    *,
    max_examples: int = MAX_EXAMPLES,
    imbalance_warn_ratio: float = IMBALANCE_WARN_RATIO,
    seed: int = 0,
) -> AuditReport:
    """Audits a train split and (optionally) an eval split.

    Args:
      train_source, eval_source: random-access sources of {"inputs": (N, ...), "labels": (N,)
        int class ids, or (N, T) next tokens}; `ArraySource`s are read directly, others through
        `get_batch`.
      max_examples: per split; above it a seeded random sample of this many is audited.
      imbalance_warn_ratio: largest/smallest class count above which imbalance is a warning.
      seed: picks the sample when a split exceeds `max_examples`.
    Returns:
      An `AuditReport`. Indices in it are indices into the sources.
    Raises:
      DataError: a source without an "inputs" array or empty, before anything is hashed.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples: expected an int >= 1, got {max_examples}")
    splits = (
        {"train": train_source}
        if eval_source is None
        else {
            "train": train_source,
            "eval": eval_source,
        }
    )
    issues: list[Issue] = []
    stats: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    data = {}
    for split, source in splits.items():
        if len(source) == 0:
            raise DataError(f"data ({split} split): expected at least one example, got 0")
        probe = sources.get_batch(source, np.array([0]))
        cap = max_examples
        if _is_token_sequences(np.asarray(probe["inputs"]), probe.get("labels")):
            cap = min(max_examples, MAX_TOKEN_EXAMPLES)
        arrays, indices = _gather(source, cap, seed)
        if "inputs" not in arrays:
            raise DataError(
                f"data ({split} split): expected examples with an 'inputs' key, got keys "
                f"{sorted(arrays)}"
            )
        x, y = np.asarray(arrays["inputs"]), arrays.get("labels")
        y = None if y is None else np.asarray(y)
        data[split] = (x, y, indices)
    tokens = any(_is_token_sequences(x, y) for x, y, _ in data.values())
    if tokens:
        skipped.append(
            "class balance, conflicting labels, constant features, NaN/Inf: the data are token "
            "sequences (integer inputs, next-token labels of the same shape), to which they do "
            "not apply"
        )

    rows, keys = {}, {}
    for split, (x, y, indices) in data.items():
        stats[split] = _split_stats(x, y, len(splits[split]), tokens)
        rows[split] = _row_bytes(x)
        keys[split] = _hashes(rows[split])
        # Duplicates within the split.
        dups = _exact(_groups(keys[split]), rows[split])
        if dups:
            extra = sum(len(g) - 1 for g in dups)
            issues.append(
                Issue(
                    "duplicates",
                    "warning",
                    split,
                    f"{split}: {extra} exact duplicate examples ({len(dups)} groups of identical "
                    f"inputs, {sum(len(g) for g in dups)} examples in them)",
                    extra,
                    [[int(indices[i]) for i in g] for g in dups[:NUM_EXAMPLES_SHOWN]],
                )
            )
        stats[split]["duplicate_examples"] = sum(len(g) - 1 for g in dups)
        if tokens:
            continue
        s = stats[split]
        if s.get("nonfinite_values"):
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            where = indices[np.flatnonzero(bad)]
            issues.append(
                Issue(
                    "nonfinite",
                    "error",
                    split,
                    f"{split}: {s['nonfinite_values']} NaN/Inf values ({s['nan_values']} NaN) in "
                    f"{len(where)} examples",
                    len(where),
                    _index_list(where),
                )
            )
        if len(x) > 1:
            flat = x.reshape(len(x), -1)
            # Equal to the first row everywhere (NaN-safe: NaN != NaN counts as varying).
            constant = np.flatnonzero((flat == flat[0]).all(axis=0))
            s["constant_features"] = len(constant)
            if len(constant):
                issues.append(
                    Issue(
                        "constant_features",
                        # Border pixels of centred images are often constant: a note,
                        # unless no feature varies at all.
                        "info" if len(constant) < flat.shape[1] else "error",
                        split,
                        f"{split}: {len(constant)} of {flat.shape[1]} input features are constant "
                        f"(one value in every example)",
                        len(constant),
                        _index_list(constant),
                    )
                )
        if "class_counts" in s:
            ratio = s["imbalance_ratio"]
            if ratio > imbalance_warn_ratio or s["classes_missing"]:
                counts = s["class_counts"]
                big, small = (
                    max(counts, key=counts.get),
                    min((c for c in counts if counts[c]), key=counts.get),
                )
                missing = (
                    f"; classes {s['classes_missing']} have no examples"
                    if s["classes_missing"]
                    else ""
                )
                issues.append(
                    Issue(
                        "class_imbalance",
                        "warning",
                        split,
                        f"{split}: class imbalance {ratio:.3g} (class {big}: {counts[big]} "
                        f"examples, class {small}: {counts[small]}){missing}",
                        len(counts),
                        [big, small],
                    )
                )

    if "eval" in data:
        issues += _cross_split(data, rows, keys, tokens)
    elif not tokens:
        issues += _conflicts({"train": data["train"]}, rows, keys)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    issues.sort(key=lambda i: order[i.severity])
    return AuditReport(issues, stats, skipped)


def _cross_split(data, rows, keys, tokens: bool) -> list[Issue]:
    """Leakage (eval examples also in train) and conflicting labels over both splits."""
    issues = []
    x_train, x_eval = data["train"][0], data["eval"][0]
    if x_train.shape[1:] != x_eval.shape[1:] or x_train.dtype != x_eval.dtype:
        return issues  # different shapes or dtypes cannot be byte-equal
    train_keys = keys["train"]
    in_train = np.isin(keys["eval"], train_keys)
    pairs = []
    if in_train.any():
        lookup: dict[bytes, int] = {}
        for j, k in enumerate(train_keys):
            lookup.setdefault(k.tobytes(), j)
        for i in np.flatnonzero(in_train):
            j = lookup[keys["eval"][i].tobytes()]
            if np.array_equal(rows["eval"][i], rows["train"][j]):
                pairs.append((int(i), int(j)))
    if pairs:
        ev_idx, tr_idx = data["eval"][2], data["train"][2]
        n_eval = len(x_eval)
        issues.append(
            Issue(
                "leakage",
                "error",
                "train+eval",
                f"leakage: {len(pairs)} of {n_eval} eval examples "
                f"({100 * len(pairs) / n_eval:.2f}%) are exact copies of training examples",
                len(pairs),
                [
                    {"eval": int(ev_idx[i]), "train": int(tr_idx[j])}
                    for i, j in pairs[:NUM_EXAMPLES_SHOWN]
                ],
            )
        )
    if not tokens:
        issues += _conflicts(data, rows, keys)
    return issues


def _conflicts(data, rows, keys) -> list[Issue]:
    """Groups of identical inputs (within and across the splits) with different labels."""
    names = list(data)
    if not all(_is_class_labels(data[s][1], len(data[s][0])) for s in names):
        return []
    all_keys = np.concatenate([keys[s] for s in names])
    all_rows = np.concatenate([rows[s] for s in names]) if len(names) > 1 else rows[names[0]]
    labels = np.concatenate([data[s][1] for s in names])
    split_of = np.concatenate([np.full(len(data[s][0]), k) for k, s in enumerate(names)])
    index_of = np.concatenate([data[s][2] for s in names])
    conflicting = []
    for g in _exact(_groups(all_keys), all_rows):
        if len(np.unique(labels[g])) > 1:
            conflicting.append(g)
    if not conflicting:
        return []
    count = sum(len(g) for g in conflicting)
    shown = [
        [
            {"split": names[split_of[i]], "index": int(index_of[i]), "label": int(labels[i])}
            for i in g
        ]
        for g in conflicting[:NUM_EXAMPLES_SHOWN]
    ]
    where = "+".join(names)
    return [
        Issue(
            "conflicting_labels",
            "error",
            where,
            f"conflicting labels: {len(conflicting)} groups of identical inputs ({count} "
            f"examples, {where}) carry different labels",
            count,
            shown,
        )
    ]


# --------------------------------------------------------------------------------------------
# The automatic audit in `fit`.


def audit_for_fit(
    train_source, eval_source, policy: str, log, max_examples: int
) -> AuditReport | None:
    """`data.audit` before compiling: "off" -> None; "warn" logs the summary line; "fail"
    also raises a `DataError` listing the errors (leakage, conflicting labels, NaN/Inf)."""
    if policy == "off":
        return None
    report = audit_datasets(train_source, eval_source, max_examples=max_examples)
    if policy == "fail" and report.errors:
        raise DataError(
            "data.audit=fail: "
            + "; ".join(i.message for i in report.errors)
            + " (see `dlkit audit EXPERIMENT` for the report; data.audit=warn to train anyway)"
        )
    serious = any(i.severity != "info" for i in report.issues)
    log(("warning: " if serious else "") + report.summary())
    return report
