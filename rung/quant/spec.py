"""Model specs: ``NAME_OR_PATH[@FORMAT]``, everywhere a model is named.

FORMAT is a float dtype (``fp32``, ``bf16``, ``fp16``) or a weight-only format: ``int8``
(per-channel scales), ``int4`` (groups of 32, asymmetric), either with a group size, e.g.
``int8g32``, ``int4g128``; or ``fp8`` (float8 e4m3 weights, one float32 scale per output row, the
LM head left float: ``torch._scaled_mm`` on Hopper, dequantized on the CPU). A spec without a
format loads float32. For a GGUF file, ``int4`` keeps Q4_0 / Q4_1 tensors as they are and ``int8``
keeps Q8_0 tensors (rung's formats hold those blocks exactly); tensors in other types are
dequantized and quantized to the format asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FLOATS = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
WEIGHT_FORMATS = {"int8": "q8", "int4": "q4", "fp8": "f8"}
_PATTERN = re.compile(r"^(int8|int4)(?:g(\d+))?$")


@dataclass(frozen=True)
class ModelSpec:
    model: str  # a name or path, as resolve_model takes it
    dtype: str | None = None  # a float dtype the spec asks for
    weights: str | None = None  # "q8" | "q4" | "f8": packed weight-only format
    group: int | None = None

    @property
    def format_name(self) -> str:
        if self.weights is None:
            return self.dtype or "float32"
        name = {"q8": "int8", "q4": "int4", "f8": "fp8"}[self.weights]
        return name + (f"g{self.group}" if self.group else "")


def parse_spec(spec: str) -> ModelSpec:
    """``smollm2-135m@int4`` → ModelSpec("smollm2-135m", weights="q4"). An '@' inside a path
    (a folder called ``v1@2``) only counts when what follows it is a known format."""
    text = str(spec)
    model, sep, fmt = text.rpartition("@")
    if not sep:
        return ModelSpec(text)
    key = fmt.lower()
    if key in FLOATS:
        return ModelSpec(model, dtype=FLOATS[key])
    if key == "fp8":
        return ModelSpec(model, weights="f8")
    m = _PATTERN.match(key)
    if m:
        group = int(m.group(2)) if m.group(2) else None
        if group is not None and (group < 32 or group % 32):
            raise ValueError(f"model spec {text!r}: group size {group} must be a positive multiple of 32")
        return ModelSpec(model, weights=WEIGHT_FORMATS[m.group(1)], group=group)
    if "/" in fmt or "." in fmt:
        return ModelSpec(text)  # part of a path
    raise ValueError(f"model spec {text!r}: unknown format {fmt!r}; use fp32, bf16, fp16, int8, int4, fp8, "
                     "int8gN or int4gN (N a multiple of 32)")
