"""The worker process of `spotrun launch --function module:fn`: fn(config) inside a session.

Ray Train users hand over a `train_func(config)`; this module is what turns it into a
worker process, so the function needs no `if __name__ == "__main__"` block and the session
(process group, preemption notice, resume) is up before the first line of user code runs.
Run as `python -m spotrun.train._function_worker module:fn`; the launcher does that.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from spotrun import contract
from spotrun.train.session import get_session


class FunctionNotFound(LookupError):
    """`module:fn` does not name a callable; the message says which part is wrong."""


def resolve(target: str) -> Callable[..., Any]:
    """Import `module:fn` (fn may be dotted: `module:Class.method`) and return the callable."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise FunctionNotFound(f"expected module:function, got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise FunctionNotFound(
            f"cannot import {module_name!r} for {target!r}: {err}; the working directory "
            "and PYTHONPATH are searched, run from the directory that holds the module"
        ) from err
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FunctionNotFound(f"{module_name!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise FunctionNotFound(f"{target!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def call_with_config(fn: Callable[..., Any], config: dict[str, Any]) -> Any:
    """fn(config), or fn() for a function that takes no arguments (as Ray Train allows)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(config)
    if not parameters:
        return fn()
    return fn(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the session, call the function with the job's config, finish the session."""
    args = list(sys.argv[1:] if argv is None else argv)
    target = args[0] if args else contract.PodContract.from_env().function
    if not target:
        raise FunctionNotFound(f"no function to call: pass module:fn or set {contract.FUNCTION}")
    fn = resolve(target)
    session = get_session()
    call_with_config(fn, dict(session.context.config))
    session.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
