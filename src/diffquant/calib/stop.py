"""The one way diffquant ends a forward early: a hook calls :func:`stop_forward` once it has what it
needs (a unit's input, a layer's output), and :func:`run_stoppable` runs the forward and swallows
exactly that stop, so the rest of the network costs nothing. Used by module capture, the unit
caches, LES's layer capture and PTS voting."""
from __future__ import annotations

from typing import Any, Callable, NoReturn

from torch import nn


class StopForward(Exception):
    """Raised by a hook to end the current forward early; caught only by :func:`run_stoppable`."""


def stop_forward() -> NoReturn:
    raise StopForward


def run_stoppable(run: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """``run(*args, **kwargs)``; True when a hook ended it early with :func:`stop_forward`."""
    try:
        run(*args, **kwargs)
    except StopForward:
        return True
    return False


def stop_after(module: nn.Module):
    """A forward hook on ``module`` that ends the forward once the module has run (a handle:
    ``.remove()`` it)."""
    return module.register_forward_hook(lambda mod, args, output: stop_forward())


__all__ = ["StopForward", "run_stoppable", "stop_after", "stop_forward"]
