"""lb.collector.paused: the cyclic collector off for a sync, back as it was after."""

from __future__ import annotations

import gc

import pytest

from lb.collector import paused


def test_paused_holds_the_collector_off_and_restores_it() -> None:
    assert gc.isenabled()
    with paused():
        assert not gc.isenabled()
        with paused():  # a sync inside a sync keeps it off
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused():
        raise RuntimeError("a sync that raised")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()
