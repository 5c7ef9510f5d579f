"""fpidsl.compiler.paused_gc: the collector paused while compiling, the objects made meanwhile handed to the oldest
generation, and collection as usual afterwards: a cycle made while paused is still collected, nothing is left
frozen, and a caller's own settings (collector off, objects frozen) are left as they were."""
from __future__ import annotations

import gc
import weakref

import pytest

from fpidsl.compiler import HAND_OVER, check_source, paused_gc
from fpidsl.source import Source

SPEC = "layer L {\n  input a : [B, 3]\n  state x : [B, 3] = zeros\n  update x = 0.5 * x + a\n}\n"


class _Node:
    pass


def test_the_collector_runs_again_after_a_check_with_nothing_frozen():
    assert gc.isenabled()
    check_source(Source("t.fpi", SPEC))
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.parametrize("made", [0, 2 * HAND_OVER])  # a small compile, and one whose objects are handed over
def test_a_cycle_made_while_paused_is_collected_afterwards(made):
    with paused_gc():
        assert not gc.isenabled()
        kept = [[] for _ in range(made)]
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
    assert alive() is not None  # only a cycle: the collector must find it
    assert gc.get_freeze_count() == 0 and len(kept) == made
    if made:  # handed to the oldest generation, not left for a young collection to walk
        assert any(o is kept[0] for o in gc.get_objects(generation=2))
    gc.collect()
    assert alive() is None


def _in_a_generation(obj) -> bool:
    """Whether the collector tracks ``obj`` in one of its generations (not frozen in the permanent one)."""
    return any(o is obj for generation in range(3) for o in gc.get_objects(generation=generation))


def test_a_callers_frozen_objects_and_disabled_collector_are_left_alone():
    """A frozen object of the caller's stays frozen. (Not the exact freeze count: frozen objects that another
    thread of the test process releases meanwhile leave the count, which made this test fail once in a full run.)"""
    mine = [_Node()]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert not _in_a_generation(mine)
        with paused_gc():
            kept = [[] for _ in range(2 * HAND_OVER)]
        # no hand-over: it would unfreeze mine (the count to 0) or freeze the new objects (the count above frozen)
        assert 0 < gc.get_freeze_count() <= frozen and not _in_a_generation(mine)
        assert gc.isenabled() and len(kept) == 2 * HAND_OVER
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
