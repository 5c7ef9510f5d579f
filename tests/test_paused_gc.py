"""fpidsl.compiler.paused_gc: the collector paused while compiling, the objects made meanwhile handed to the oldest
generation, and collection as usual afterwards: a cycle made while paused is still collected, nothing is left
frozen, and a caller's own settings (collector off, objects frozen) are left as they were."""
from __future__ import annotations

import gc
import weakref

from fpidsl.compiler import check_source, paused_gc
from fpidsl.source import Source

SPEC = "layer L {\n  input a : [B, 3]\n  state x : [B, 3] = zeros\n  update x = 0.5 * x + a\n}\n"


class _Node:
    pass


def test_the_collector_runs_again_after_a_check_with_nothing_frozen():
    assert gc.isenabled()
    check_source(Source("t.fpi", SPEC))
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_cycle_made_while_paused_is_collected_afterwards():
    with paused_gc():
        assert not gc.isenabled()
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
    assert alive() is not None  # only a cycle: the collector must find it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None


def test_a_callers_frozen_objects_and_disabled_collector_are_left_alone():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with paused_gc():
            _Node()
        assert gc.get_freeze_count() == frozen and gc.isenabled()
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
