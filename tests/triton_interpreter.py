"""Test-only fix for Triton's interpreter (TRITON_INTERPRET=1) under NumPy 2: it turns a scalar into a Python
int with ``int(array)``, but its scalars are 1-element arrays, which NumPy 2 refuses. Loop bounds read from
memory (``range(start, stop)`` over loaded lengths) then fail on the CPU, though they compile on a GPU."""

from __future__ import annotations


def allow_loaded_loop_bounds() -> None:
    """Patch the interpreter so a 1-element tensor converts to an index (idempotent)."""
    import triton.runtime.interpreter as interpreter

    if getattr(interpreter, "_longserve_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    interpreter._longserve_patched = True
