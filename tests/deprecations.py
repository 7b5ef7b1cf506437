"""Deprecation warnings are attributed to the code that made the deprecated call.

pyproject.toml's `filterwarnings` turns FutureWarning and DeprecationWarning into errors when the warning
is attributed to a vdep module, and ignores them otherwise (third-party noise). A library names the
caller with `stacklevel`, but when the deprecated function is a decorated `nn.Module.forward` (as
transformers' `deprecate_kwarg` on `LlamaModel.forward`), one level up is torch's `Module.__call__`, so
the warning would be attributed to torch/nn/modules/module.py and the vdep call that passed the
deprecated argument would go unnoticed. `install()` wraps `warnings.warn` so that such a warning is
attributed to the first frame outside that call machinery instead.
"""

from __future__ import annotations

import os
import sys
import warnings

# Frames that only pass a call on: torch's Module.__call__ and transformers' forward decorators.
CALL_MACHINERY = (
    os.path.join("torch", "nn", "modules", "module.py"),
    os.path.join("transformers", "utils", "generic.py"),
    os.path.join("transformers", "utils", "deprecation.py"),
)

_original_warn = warnings.warn


def _is_machinery(filename: str) -> bool:
    return filename.endswith(CALL_MACHINERY)


def _warn(message, category=None, stacklevel=1, source=None, **kwargs):
    if category is None:
        category = type(message) if isinstance(message, Warning) else UserWarning
    stacklevel = max(stacklevel, 1)  # as warnings.warn reads it
    if issubclass(category, (DeprecationWarning, FutureWarning)):
        try:
            frame = sys._getframe(stacklevel)  # the frame the warning is attributed to (1: warn's caller)
        except ValueError:
            frame = None
        while frame is not None and frame.f_back is not None and _is_machinery(frame.f_code.co_filename):
            frame = frame.f_back
            stacklevel += 1
    _original_warn(message, category, stacklevel + 1, source, **kwargs)  # + 1: this wrapper


def install() -> None:
    warnings.warn = _warn
