"""Deprecated calls made by vdep fail the tests; the same warnings caused by other code stay quiet.

pyproject.toml's `filterwarnings` errors on FutureWarning/DeprecationWarning attributed to a vdep module;
tests/deprecations.py attributes a warning raised inside a decorated `nn.Module.forward` to the caller of
the module (transformers' `deprecate_kwarg` names torch's `Module.__call__`, one level up).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers.utils.deprecation import deprecate_kwarg


class Decoder(torch.nn.Module):
    @deprecate_kwarg("past_key_values", "99.0.0", new_name="cache")
    def forward(self, x: torch.Tensor, cache: object = None) -> torch.Tensor:
        return x


def call_from(module_name: str) -> None:
    """Call the decoder with the deprecated name from code whose module is `module_name`."""
    # exec, so that the call's frame has the module name the attribution reads (no other way to fake a caller)
    exec("decoder(torch.zeros(1), past_key_values=None)",  # noqa: S102
         {"__name__": module_name, "decoder": Decoder(), "torch": torch})


def test_a_deprecated_forward_argument_is_attributed_to_the_module_caller():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Decoder()(torch.zeros(1), past_key_values=None)
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]  # not torch/nn/modules/module.py


def test_deprecated_calls_from_vdep_are_errors_and_from_elsewhere_are_ignored():
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
        call_from("vdep.model.generate")
    call_from("peft.tuners.lora")  # third-party noise: no error
