"""The JSON style of the golden reference files, shared by gen_models.py (and through it
gen_families.py), gen_adapters.py (.peer/venv/bin/python) and gen_bottleneck.py
(.venv-adapters/bin/python, which has no gguf: this module needs only numpy): not a generator itself.

Floats carry 7 significant digits (Exact ones 9, an exact fp32 round trip), lists of scalars stay on
one line and everything else is indented by one space, so the files are small and diff well.
"""
import json
import math
from pathlib import Path

import numpy as np


def fmt_float(x: float, digits: int = 7) -> str:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError("non-finite value in golden data")
    s = "%.*g" % (digits, x)
    return "0" if s == "-0" else s


class Exact(float):
    """A float that the JSON writer prints with 9 significant digits (exact fp32 round trip)."""


def dump_json(obj, indent: int = 0) -> str:
    """Compact-but-diffable JSON: scalar lists on one line, everything else indented."""
    pad = " " * indent
    pad2 = " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad2}{json.dumps(k)}: {dump_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ",".join(dump_json(v) for v in obj) + "]"
        items = [pad2 + dump_json(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(obj, bool) or obj is None:
        return json.dumps(obj)
    if isinstance(obj, Exact):
        return fmt_float(obj, 9)
    if isinstance(obj, float):
        return fmt_float(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    if isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False)
    raise TypeError(type(obj))


def write_text(path: Path, text: str) -> None:
    """UTF-8 text at path, its directory made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def round_row(row) -> list:
    """A logits row rounded to fp32, as Python floats."""
    return [float(v) for v in np.asarray(row, dtype=np.float32).tolist()]
