"""Running the Triton kernels' checks on the CPU: under Triton's interpreter (TRITON_INTERPRET=1), then
lowering every kernel they launched to an sm_90 binary (``run_checks``).

- The interpreter under NumPy 2 turns a scalar into a Python int with ``int(array)``, but its scalars are
  1-element arrays, which NumPy 2 refuses: loop bounds read from memory (``range(start, stop)`` over loaded
  lengths) fail on the CPU, though they compile on a GPU (``allow_loaded_loop_bounds``).
- The interpreter forgives what the compiler does not (a loop variable that changes type, a reassigned
  constexpr, an op with no lowering). So the interpreted run records each launch's argument types and
  constexprs (``record_launches``), and a process without the interpreter compiles every distinct one for
  Hopper (``lower_recorded``): CI catches a kernel that would fail on its first launch on a GPU.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_checks(code: str, directory: Path, timeout: float = 300) -> None:
    """Run ``code`` (checks that print nothing; modules importable from ``directory``) under the interpreter,
    then lower what it launched; asserts both succeed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(directory), str(HERE), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as scratch:
        record = os.path.join(scratch, "launches.jsonl")
        prelude = (
            f"import triton_interpreter as t; t.allow_loaded_loop_bounds(); t.record_launches({record!r}); "
        )
        done = subprocess.run([sys.executable, "-c", prelude + code + "; print('ok')"], env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
        del env["TRITON_INTERPRET"]
        lowering = f"import triton_interpreter as t; print(t.lower_recorded({record!r}))"
        done = subprocess.run([sys.executable, "-c", lowering], env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        assert done.returncode == 0 and int(done.stdout.strip()) > 0, done.stderr[-3000:]


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


LAUNCH_OPTIONS = ("num_warps", "num_stages")
_SKIP_MODULES = ("triton.",)  # Triton's own kernels, if any run


def record_launches(path: str) -> None:
    """From now on, every interpreted launch appends its kernel, argument types and constexprs to ``path``
    (JSON lines; ``lower_recorded`` compiles them)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        parameters = inspect.signature(fn).parameters
        bound = dict(zip(self.arg_names, args, strict=False))  # (kwargs may name the rest)
        bound.update({k: v for k, v in kwargs.items() if k in parameters})
        signature, constexprs = {}, {}
        for name, parameter in parameters.items():
            value = bound.get(name, parameter.default)
            if "constexpr" in str(parameter.annotation) or value is None:
                signature[name] = "constexpr"
                constexprs[name] = _constexpr_json(value)
            else:  # a tensor's pointer type, or a scalar's
                signature[name] = mangle_type(value)
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        entry = dict(module=fn.__module__, name=fn.__name__, signature=signature, constexprs=constexprs,
                     options=options)  # fmt: skip
        if not fn.__module__.startswith(_SKIP_MODULES):
            with open(path, "a") as out:
                out.write(json.dumps(entry, sort_keys=True) + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def _constexpr_json(value):
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return {"dtype": str(value)}  # a triton.language dtype


def lower_recorded(path: str, capability: int = 90) -> int:
    """Compile every distinct launch recorded in ``path`` for ``sm_<capability>``; returns how many."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with open(path) as lines:
        entries = {line.strip() for line in lines if line.strip()}
    for line in sorted(entries):
        entry = json.loads(line)
        fn = getattr(importlib.import_module(entry["module"]), entry["name"])
        constexprs = {
            name: getattr(tl, value["dtype"]) if isinstance(value, dict) else value
            for name, value in entry["constexprs"].items()
        }
        source = ASTSource(fn, entry["signature"], constexprs=constexprs)
        try:
            triton.compile(source, target=GPUTarget("cuda", capability, 32), options=entry["options"])
        except Exception as exc:  # the kernel and its launch, then the compiler's own message
            raise AssertionError(f"{entry['module']}.{entry['name']} {entry['constexprs']}: {exc}") from exc
    return len(entries)
