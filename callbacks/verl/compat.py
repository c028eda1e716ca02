"""Let verl 0.9.1 and trl 1.x live in one environment, without touching verl's files.

verl guards its use of trl's ``AutoModelForCausalLMWithValueHead`` with
``verl.utils.import_utils.is_trl_available()``, which only asks whether a ``trl`` package is
installed. trl 1.x removed that class (neither ``trl`` nor ``trl.experimental.ppo`` has it), so
with trl 1.16 installed every actor start-up fails: the FSDP engine's ``_build_module`` calls
``verl.models.transformers.monkey_patch.apply_monkey_patch`` for every model, which (when
``is_trl_available()``) imports the class from ``trl.experimental.ppo``, then from ``trl``, and the
second import raises ``ImportError: cannot import name 'AutoModelForCausalLMWithValueHead' from
'trl'`` (monkey_patch.py lines 352-356 in verl 0.9.1).

The only other users, ``verl.utils.model.load_valuehead_model`` / ``patch_valuehead_model``
(critic models without a token-classification head), need the same class. :func:`apply` makes
verl's ``is_trl_available`` answer the question verl actually asks -- is trl's value-head model
importable? -- in ``verl.utils.import_utils`` and in every verl module that already bound the
name. With trl 0.x (which has the class) nothing changes; with trl 1.x verl skips the value-head
patch, as it does when trl is absent.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys

# verl modules that do ``from verl.utils.import_utils import is_trl_available`` (verl 0.9.1).
_BOUND_IN = ("verl.models.transformers.monkey_patch", "verl.utils.model")


@functools.cache
def trl_value_head_available() -> bool:
    """True when trl is installed and provides ``AutoModelForCausalLMWithValueHead`` (trl < 1.0)."""
    if importlib.util.find_spec("trl") is None:
        return False
    for module_name in ("trl", "trl.experimental.ppo"):  # where trl 0.x had it, newest last
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "AutoModelForCausalLMWithValueHead"):
            return True
    return False


def apply() -> None:
    """Install the fix in this process (idempotent; imports ``verl.utils.import_utils``, so the ``verl``
    package, which every process running verl has imported anyway).

    Call it before verl builds a model -- the verl worker module and the Ray setup hook do. Modules
    imported later bind the fixed function; modules already imported are updated in place.
    """
    import_utils = importlib.import_module("verl.utils.import_utils")
    import_utils.is_trl_available = trl_value_head_available
    for name in _BOUND_IN:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "is_trl_available"):
            module.is_trl_available = trl_value_head_available
