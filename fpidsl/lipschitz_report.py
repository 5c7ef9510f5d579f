"""``fpidsl check --lipschitz``: the static Lipschitz bound of each layer (:mod:`fpidsl.passes.lipschitz`) at its
initial weights, which come from the compiled layer (so this module sits above the code generator)."""
from __future__ import annotations

import math

from .passes.lipschitz import INF, Bound, bound_layer

# The numbers of a layer's initial weights that the bound is computed for. The weights are made (float32) and each
# matrix's singular values computed in float64 (an 8192 x 8192 one takes about half a minute): past this, the bound
# is unknown (with the reason) instead of filling the memory or running for hours.
MAX_BOUND_NUMBERS = 2**26  # 67,108,864 numbers, 256 MiB of float32


def initial_weights(checked, layer: str) -> dict:
    """The initial weights of a layer (seed 0): param node -> tensor, from the compiled module."""
    import torch

    from .codegen.emit import emit_module
    from .loader import module_from_source

    code = emit_module(checked, only=layer)
    module = module_from_source(code, f"<fpidsl lipschitz {layer}>", f"fpidsl_lipschitz_{layer}")
    torch.manual_seed(0)
    cls = module.LAYERS[layer]
    instance = cls(**{name: torch.nn.Identity() for name in cls.EXTERNS})  # externs have no Lipschitz rule
    graph = checked.graphs[layer]
    tensors = dict(zip(graph.params, instance.parameter_tensors()))
    return {graph.params[name]: t.detach() for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def _weight_numbers(graph) -> int:
    """How many numbers the tensors of a layer's params hold (an extern's module, its parameters and dropout's
    seeds are not made for the bound: externs are replaced by the identity). A param's shape is concrete."""
    return sum(math.prod(graph.shape(nid)) for nid in graph.params.values()
               if graph.node(nid).get("role") not in ("module", "parameters", "seeds"))


def _unknown(graph, reason: str) -> list[Bound]:
    """Every bound of :func:`bound_layer` for ``graph``, unknown for ``reason``."""
    out = [Bound(state, INF, reason) for state in graph.states]
    if len(out) > 1:
        out.append(Bound(", ".join(graph.states) + " together", INF, reason, joint=True))
    return out


def _out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, or torch's allocator refusing ("DefaultCPUAllocator: can't
    allocate memory", a RuntimeError), not any other error (that is a bug, and must show as one)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def layer_bounds(checked, layer: str) -> list[Bound]:
    """:func:`bound_layer` of a layer at its initial weights (:func:`initial_weights`); unknown, with the reason,
    where the weights are more than :data:`MAX_BOUND_NUMBERS` numbers or do not fit in the memory."""
    graph = checked.graphs[layer]
    numbers = _weight_numbers(graph)
    if numbers > MAX_BOUND_NUMBERS:
        return _unknown(graph, f"the initial weights are {numbers:,} numbers, more than the static bound is "
                               f"computed for ({MAX_BOUND_NUMBERS:,})")
    try:
        return bound_layer(graph, initial_weights(checked, layer))
    except (RuntimeError, MemoryError) as exc:
        if not _out_of_memory(exc):
            raise
        return _unknown(graph, f"the initial weights ({numbers:,} numbers) and their singular values do not fit "
                               "in the memory")


def _number(value: float) -> str:
    """A bound in 3 digits, more where 3 would round it to 1 (0.99976 is not "1 < 1", nor 1.00027 "1")."""
    text = f"{value:.3g}"
    return text if float(text) != 1 or value == 1 else f"{value:.6g}"


def report_lipschitz(checked, stream) -> int:
    """Print the bound of each layer of a checked spec; returns how many bounds are not below 1 (one per state,
    and for a layer with several states one more for all of them together, which is what convergence needs)."""
    warnings = 0
    for name, graph in checked.graphs.items():
        bounds = layer_bounds(checked, name)
        several = len(bounds) > 1
        for bound in bounds:
            first = next(iter(graph.states.values()))
            where = f"{(first if bound.joint else graph.states[bound.state]).span}"
            if bound.value < 1:
                if bound.joint:
                    print(f"{where}: layer {name}: g is a contraction in its states {bound.state} at the initial "
                          f"weights (Lipschitz bound {_number(bound.value)} < 1)", file=stream)
                elif several:
                    print(f"{where}: layer {name}: the Lipschitz bound of g in {bound.state} (the other states "
                          f"held fixed) is {_number(bound.value)} at the initial weights", file=stream)
                else:
                    print(f"{where}: layer {name}: g is a contraction in {bound.state} at the initial weights "
                          f"(Lipschitz bound {_number(bound.value)} < 1)", file=stream)
                continue
            warnings += 1
            text = _number(bound.value) if bound.value < INF else "unknown"
            what = f"its states {bound.state}" if bound.joint else bound.state
            print(f"{where}: warning: layer {name}: the Lipschitz bound of g in {what} is {text} at the "
                  "initial weights; the fixed-point iterations may not converge", file=stream)
            if bound.reason:
                print(f"  because: {bound.reason}", file=stream)
            print("hint: use a smaller init_scale, norm=spectral on the modules, or a smaller descend step; "
                  "the runtime's contraction estimate at the fixed point is sharper", file=stream)
    return warnings
