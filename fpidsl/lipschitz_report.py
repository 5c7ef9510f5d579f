"""``fpidsl check --lipschitz``: the static Lipschitz bound of each layer (:mod:`fpidsl.passes.lipschitz`) at its
initial weights, which come from the compiled layer (so this module sits above the code generator)."""
from __future__ import annotations

from .passes.lipschitz import INF, bound_layer


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


def _number(value: float) -> str:
    """A bound in 3 digits, more where 3 would round it to 1 (0.99976 is not "1 < 1", nor 1.00027 "1")."""
    text = f"{value:.3g}"
    return text if float(text) != 1 or value == 1 else f"{value:.6g}"


def report_lipschitz(checked, stream) -> int:
    """Print the bound of each layer of a checked spec; returns how many bounds are not below 1 (one per state,
    and for a layer with several states one more for all of them together, which is what convergence needs)."""
    warnings = 0
    for name, graph in checked.graphs.items():
        weights = initial_weights(checked, name)
        bounds = bound_layer(graph, weights)
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
