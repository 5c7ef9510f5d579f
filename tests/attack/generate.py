"""A grammar-aware generator of random valid specs, for hypothesis.

Every generated layer is valid by construction and its map is a contraction (so that its fixed point exists
and iteration finds it): each update is ``x <- c * tanh(E) + (input term)`` with ``c <= 0.4`` and ``E``
built from 1-Lipschitz pieces of the states (``tanh``, ``sin``, ``relu``, ``sigmoid``, ``clamp``,
averages, products with a sigmoid, reductions by ``mean``, indexing and ``cat``), numbers folded at compile
time (``tanh(0.5)``), consts, lets, fns and param modules of small weights; or a gradient step on an energy
whose minimiser is unique. Each spec is written both as ``.fpi`` text and as YAML.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

UNARY = ("tanh", "sin", "relu")


@dataclass
class Spec:
    """A generated layer: its parts, rendered by :meth:`fpi` and :meth:`yaml`."""

    n: int  # the feature size of the states and of input a
    states: list[str]
    inputs: dict[str, str] = field(default_factory=dict)  # name -> shape text
    params: dict[str, str] = field(default_factory=dict)  # name -> type text
    consts: dict[str, str] = field(default_factory=dict)
    lets: list[tuple[str, str]] = field(default_factory=list)
    fns: dict[str, tuple[list[str], str]] = field(default_factory=dict)  # name -> (params, body)
    energies: dict[str, str] = field(default_factory=dict)
    updates: dict[str, str] = field(default_factory=dict)
    descend: dict[str, tuple[str, str]] = field(default_factory=dict)  # state -> (energy, step)
    output: list[str] = field(default_factory=list)
    solve: dict[str, str] = field(default_factory=dict)

    def fpi(self) -> str:
        out = [f"fn {name}({', '.join(ps)}) = {body}" for name, (ps, body) in self.fns.items()]
        out.append("layer G {")
        out += [f"  input {k} : {v}" for k, v in self.inputs.items()]
        out += [f"  state {s} : [B, {self.n}] = zeros" for s in self.states]
        out += [f"  param {k} : {v}" for k, v in self.params.items()]
        out += [f"  const {k} = {v}" for k, v in self.consts.items()]
        out += [f"  let {k} = {v}" for k, v in self.lets]
        out += [f"  energy {k} = {v}" for k, v in self.energies.items()]
        out += [f"  update {k} = {v}" for k, v in self.updates.items()]
        out += [f"  descend {k} on {e} step {s}" for k, (e, s) in self.descend.items()]
        if self.output:
            out.append(f"  output {', '.join(self.output)}")
        if self.solve:
            out.append("  solve { " + ", ".join(f"{k} = {v}" for k, v in self.solve.items()) + " }")
        out.append("}")
        return "\n".join(out) + "\n"

    def yaml(self) -> str:
        def q(text: str) -> str:
            return '"' + text + '"'

        def mapping(entries) -> str:
            return "{" + ", ".join(f"{k}: {v}" for k, v in entries) + "}"

        out = ["fpi: 1"]
        if self.fns:
            out.append("fns: " + mapping((q(f"{n}({', '.join(ps)})"), q(b)) for n, (ps, b) in self.fns.items()))
        out += ["layers:", "  G:", "    inputs: " + mapping((k, q(v)) for k, v in self.inputs.items()),
                "    states: " + mapping((s, q(f"[B, {self.n}]")) for s in self.states)]
        if self.params:
            out.append("    params: " + mapping((k, q(v)) for k, v in self.params.items()))
        if self.consts:
            out.append("    consts: " + mapping((k, q(v)) for k, v in self.consts.items()))
        if self.lets:
            out.append("    lets: [" + ", ".join(mapping([(k, q(v))]) for k, v in self.lets) + "]")
        if self.energies:
            out.append("    energies: " + mapping((k, q(v)) for k, v in self.energies.items()))
        if self.updates:
            out.append("    updates: " + mapping((k, q(v)) for k, v in self.updates.items()))
        if self.descend:
            out.append("    descend: " + mapping((k, mapping([("on", e), ("step", s)]))
                                                 for k, (e, s) in self.descend.items()))
        if self.output:
            out.append("    output: [" + ", ".join(q(o) for o in self.output) + "]")
        if self.solve:
            out.append("    solve: " + mapping(self.solve.items()))
        return "\n".join(out) + "\n"


@st.composite
def numbers_only(draw) -> str:
    """An expression of numbers only, folded at compile time, with a value in [-1, 1]."""
    inner = draw(st.sampled_from(["0.5", "0 - 1", "2 * 0.25", "(1 + 2) / 6", "0.3 ** 2"]))
    return draw(st.sampled_from([f"tanh({inner})", f"sin({inner})", f"sigmoid({inner})", f"cos({inner})",
                                 f"clamp({inner}, lo=-1, hi=1)", f"{inner} / 4"]))


@st.composite
def lipschitz_expr(draw, leaves: list[str], depth: int, n: int) -> str:
    """An expression of shape [B, n], at most 1-Lipschitz in the states among ``leaves``."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(leaves))
    kind = draw(st.sampled_from(["unary", "average", "gate", "clamp", "scale", "mean", "leaky", "softplus",
                                 "reshape", "flatten", "transpose", "softmax", "logsumexp", "rotate"]))
    sub = lambda: draw(lipschitz_expr(leaves, depth - 1, n))  # noqa: E731
    if kind == "reshape":
        return f"reshape(reshape({sub()}, [B, {n}, 1]), [B, {n}])"
    if kind == "flatten":
        return f"flatten(reshape({sub()}, [B, 1, {n}]))"
    if kind == "transpose":
        return f"sum(transpose(reshape({sub()}, [B, {n}, 1]), 1, 2), dim=1)"
    if kind == "softmax":
        return f"softmax({sub()}, dim=-1)"
    if kind == "logsumexp":
        return f"logsumexp({sub()}, dim=-1, keepdim=true) + 0 * a"
    if kind == "rotate" and n >= 2:  # (an empty slice, x[..., :-1] of one feature, is an error)
        s = sub()
        return f"cat([({s})[..., -1:], ({s})[..., :-1]], dim=-1)"
    if kind == "unary":
        return f"{draw(st.sampled_from(UNARY))}({sub()})"
    if kind == "average":
        return f"({sub()} + {sub()}) / 2"
    if kind == "gate":
        return f"{sub()} * sigmoid(a)"
    if kind == "clamp":
        return f"clamp({sub()}, lo=-0.5, hi=0.5)"
    if kind == "scale":
        return f"{draw(numbers_only())} * {sub()}"
    if kind == "leaky":
        return f"leaky_relu({sub()}, slope=0.2)"
    if kind == "softplus":
        return f"softplus({sub()}) - softplus(0 * a)"
    return f"mean({sub()}, dim=-1, keepdim=true) + 0 * a"


@st.composite
def specs(draw) -> Spec:
    n = draw(st.integers(1, 3))
    two = draw(st.booleans())
    spec = Spec(n, ["x", "y"] if two else ["x"], inputs={"a": f"[B, {n}]"})
    leaves = list(spec.states)
    if draw(st.booleans()):
        spec.params["w"] = f"tensor [{n}] = normal(0, 0.3)"
        leaves.append("x * tanh(w)")
    if draw(st.booleans()):
        spec.params["fc"] = f"Linear({n}, {n}, init_scale=0.1)"
        leaves.append("fc(x)")
    if draw(st.booleans()):
        spec.consts["c"] = draw(st.sampled_from(["0.25", "1 / 4", "tanh(0.25)", "2 ** -2"]))
    if n >= 2 and draw(st.booleans()):
        leaves.append("cat([x[:, 1:], x[:, :1]], dim=-1)")  # a rotation of the features
    if draw(st.booleans()):
        spec.fns["squash"] = (["v", "k"], "k * tanh(v)")
        leaves.append("squash(x, 0.9)")
    if draw(st.booleans()):
        spec.lets.append(("h", draw(lipschitz_expr(leaves, 2, n))))
        leaves.append("h")
    scale = "c" if "c" in spec.consts else draw(st.sampled_from(["0.3", "0.4", "tanh(0.3)"]))
    use_energy = draw(st.booleans())
    for state in spec.states:
        body = draw(lipschitz_expr(leaves, 3, n))
        if use_energy and state == "x":
            # E = |x - a|^2 / 2 + s * sum(softplus(body-free term)): a strictly convex energy in x
            spec.energies["E"] = "sum(square(x - a), dim=-1) / 2"
            spec.descend["x"] = ("E", draw(st.sampled_from(["0.5", "0.7"])))
        else:
            spec.updates[state] = f"{scale} * tanh({body}) + 0.5 * a"
    if draw(st.booleans()):
        spec.output = [f"{spec.states[-1]} * 2", "x"] if two else ["tanh(x)"]
    spec.solve = {"tol": "1e-11", "max_iter": "600"}
    return spec
