"""JSON that stays JSON when a number is NaN or infinite.

    finite_json.dumps({"eval/loss": float("nan")})   # '{"eval/loss": "NaN"}', not bare NaN
    finite_json.decode({"eval/loss": "NaN"})         # {"eval/loss": nan}

Python's `json.dumps` writes NaN and Infinity as bare tokens, which strict parsers (jq, the
browser, most JSON libraries) reject, so one diverged metric would make a whole metrics.jsonl,
compute.json or manifest unreadable outside Python. Non-finite floats are written as the strings
"NaN", "Infinity" and "-Infinity" instead, and `decode` turns them back into floats.
"""

import json
import math
from typing import Any

_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode(value: Any) -> Any:
    """`value` with every non-finite float (in nested dicts, lists, tuples) as its string name."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """Inverse of `encode`: the strings "NaN", "Infinity", "-Infinity" become floats."""
    if isinstance(value, str) and value in _NAMES:
        return _NAMES[value]
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """`json.dumps` of `encode(value)`; raises ValueError rather than write a bare NaN."""
    return json.dumps(encode(value), allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """`json.loads` then `decode` (bare NaN from older files is accepted too)."""
    return decode(json.loads(text))
