"""One way to end a forward early: a hook's stop_forward ends the forward (later layers do not
run), run_stoppable swallows only that stop, and every early-stopping user goes through it."""
from __future__ import annotations

import pytest
import torch

from diffquant.calib.stop import StopForward, run_stoppable, stop_after


def test_stop_after_a_module_skips_the_rest_of_the_forward():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    ran = []
    model[2].register_forward_pre_hook(lambda m, a: ran.append("last"))
    handle = stop_after(model[0])
    assert run_stoppable(model, torch.randn(2, 3)) is True and ran == []
    handle.remove()
    assert run_stoppable(model, torch.randn(2, 3)) is False and ran == ["last"]


def test_other_errors_pass_through():
    def broken():
        raise ValueError("not a stop")

    with pytest.raises(ValueError, match="not a stop"):
        run_stoppable(broken)


def test_no_module_keeps_its_own_stop_exception():
    """The four private stop exceptions (capture, unit cache, LES capture, PTS) are gone."""
    import inspect

    from diffquant.calib import capture
    from diffquant.methods import dmq
    from diffquant.recon import cache, les

    for module in (capture, cache, les, dmq):
        own = [n for n, obj in vars(module).items() if inspect.isclass(obj) and issubclass(obj, Exception)
               and obj.__module__ == module.__name__]
        assert own == [], f"{module.__name__} defines {own}"
    assert issubclass(StopForward, Exception)
