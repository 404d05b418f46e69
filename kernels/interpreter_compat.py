"""Let Triton 3.6's interpreter take tensor loop bounds under NumPy >= 2.4 (triton-lang/triton#9171).

The interpreter holds every scalar as a one-element array and turns a loop bound into a Python int
with int(array), which NumPy 2.4 refuses for arrays that are not 0-d. Upstream fixed it after 3.6;
on a fixed Triton the patch below changes nothing.
"""
from __future__ import annotations

from typing import Any

from triton.runtime import interpreter


def patch_interpreter_scalar_index() -> None:
    original = interpreter._patch_lang_tensor
    if getattr(original, "handles_one_element_index", False):
        return

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    patch_lang_tensor.handles_one_element_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
