"""Names of the floating-point dtypes a user may give (bf16, fp16, fp32 and their torch names); torch-free."""

from __future__ import annotations

from typing import Any

from posttrain_probe.errors import ProbeError

DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""Canonical dtype names: the activation stores' dtypes, and the torch attribute names."""
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def dtype_name(dtype: Any, *, what: str = "activation") -> str:
    """Canonical name ('bfloat16', 'float16', 'float32') of a string or a torch dtype; ProbeError otherwise."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name in DTYPE_NAMES:
        return name
    raise ProbeError(f"unsupported {what} dtype {dtype!r}: expected one of bf16, fp16, fp32")
