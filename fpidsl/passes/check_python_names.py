"""Names that become Python attributes of the compiled ``nn.Module`` must not clash with its own.

A ``param NAME`` is the layer's attribute ``NAME`` (``self.NAME``); ``param forward`` or ``param parameters``
would replace a method of ``torch.nn.Module``, ``param hoist`` a function the code generator writes, and
``param class`` is not an attribute Python can write; such names are refused with the param's span. Names
starting with ``_`` are refused too: they are where ``torch.nn.Module`` and fpidsl keep their internals
(``_forward_hooks``, ``_hoisted``), now and in later versions. ``tests/codegen/test_names.py`` checks these lists
against ``dir()`` of a compiled layer, so a new attribute of the runtime cannot slip through.
"""
from __future__ import annotations

import keyword

from ..errors import ErrorSink, NameErr
from ..ir.graph import LayerGraph

# dir(torch.nn.Module) of torch 2.13 (public and private), written out so that checking needs no torch.
NN_MODULE_ATTRIBUTES = frozenset("""
T_destination _apply _call_impl _compiled_call_impl _get_backward_hooks _get_backward_pre_hooks _get_name
_load_from_state_dict _maybe_warn_non_full_backward_hook _named_members _register_load_state_dict_pre_hook
_register_state_dict_hook _replicate_for_data_parallel _save_to_state_dict _slow_forward _version
_wrapped_call_impl add_module apply bfloat16 buffers call_super_init children compile cpu cuda double
dump_patches eval extra_repr float forward get_buffer get_extra_state get_parameter get_submodule half ipu
load_state_dict modules mtia named_buffers named_children named_modules named_parameters parameters
register_backward_hook register_buffer register_forward_hook register_forward_pre_hook
register_full_backward_hook register_full_backward_pre_hook register_load_state_dict_post_hook
register_load_state_dict_pre_hook register_module register_parameter register_state_dict_post_hook
register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule share_memory state_dict to
to_empty train type xpu zero_grad training _parameters _buffers _modules
""".split())

# What fpidsl.runtime.layer.CompiledLayer and the generated class define (public names; every name starting with
# ``_`` is refused anyway).
COMPILED_LAYER_ATTRIBUTES = frozenset("""
SPEC INPUTS STATES ASSUMPTIONS SOLVE BACKWARD EVAL EXTERNS BATCHED_PARAMS INDEX_INPUTS SAMPLEWISE HOIST_BATCHED SELECTIVE_VJP_ARGS LAYERS adjoint step
hoist iterate outputs init_states parameter_tensors bind stats solve_settings backward_settings history compiled
contraction eval_settings jacobian_penalty warm configure correction_outputs eval_solve warm_start
""".split())  # the last two: constructor options (an extern module is a constructor keyword too)

RESERVED = NN_MODULE_ATTRIBUTES | COMPILED_LAYER_ATTRIBUTES


def check_python_names(graph: LayerGraph, sink: ErrorSink) -> None:
    """Refuse param names that would shadow an attribute of the compiled module."""
    seen: set[str] = set()
    for qualified, nid in graph.params.items():
        name = qualified.split(".")[0]
        if name in seen:
            continue
        seen.add(name)
        data = graph.node(nid)
        if keyword.iskeyword(name):
            sink.add(NameErr(f"param {name} is a Python keyword, and a param becomes an attribute of the compiled "
                             "module", data["span"], hint=f"rename the param, e.g. {name}_p"))
        elif name.startswith("_"):
            sink.add(NameErr(f"param {name} would replace an internal attribute: names starting with '_' are where "
                             "torch.nn.Module and fpidsl keep theirs", data["span"], hint=f"rename the param, e.g. p{name}"))
        elif name in RESERVED:
            sink.add(NameErr(
                f"param {name} would replace the compiled layer's own attribute {name!r} "
                "(of torch.nn.Module or of fpidsl's compiled layer)",
                data["span"],
                hint=f"rename the param, e.g. {name}_p",
            ))
