"""posttrain-probe: make LLM post-training observable and steerable at the level of sparse features.

The core package depends on torch, transformers and safetensors only; TRL, verl, lm-eval and
matplotlib are imported lazily where they are used.
"""

from posttrain_probe.errors import ProbeError

__version__ = "0.1.0"
__all__ = ["ProbeError", "__version__"]
