"""Property-based fuzzing of the front-end: mutated shipped specs give fpidsl's own errors, never another
exception (drop, duplicate and swap tokens; insert random bytes)."""
from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpidsl.compiler import check_source
from fpidsl.errors import FpiError, FpiErrors
from fpidsl.frontend.read import decode_source
from tests.conftest import shipped_specs

SPEC_TEXTS = {p.name: p.read_text() for p in shipped_specs()}
TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\*\*|\S")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def check_bytes(name: str, data: bytes) -> None:
    """Run the whole front half; only fpidsl's errors may come out."""
    try:
        check_source(decode_source(name, data))
    except (FpiError, FpiErrors):
        pass


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(sorted(SPEC_TEXTS)))
    toks = tokens(SPEC_TEXTS[name])
    for _ in range(draw(st.integers(1, 4))):
        if not toks:
            break
        i = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(["drop", "duplicate", "swap", "replace"]))
        if op == "drop":
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        else:
            toks[i] = draw(st.sampled_from(toks))
    return name, "".join(toks).encode()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_token_mutations_give_only_fpidsl_errors(case):
    name, data = case
    check_bytes(name, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SPEC_TEXTS)), st.data())
def test_random_bytes_give_only_fpidsl_errors(name, data):
    raw = SPEC_TEXTS[name].encode()
    at = data.draw(st.integers(0, len(raw)))
    junk = data.draw(st.binary(min_size=1, max_size=8))
    check_bytes(name, raw[:at] + junk + raw[at:])
