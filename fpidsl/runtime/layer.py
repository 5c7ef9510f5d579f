"""The base class of compiled layers and the constructors their ``__init__`` calls.

A generated layer class supplies, as plain code: ``step`` (the map g), ``adjoint`` (the derived backward
map: ``prepare`` / ``vjp_state`` / ``vjp_args``), ``init_states`` and ``outputs``; and, as data, its
inputs and states with their declared shapes, its settings and its shape assumptions. This class binds
the inputs, checks their shapes against the spec, and runs :func:`fixed_point`.
"""
from __future__ import annotations

import functools
import inspect
import math
import threading
import weakref
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .capture import NORM_HOOKS
from .settings import BACKWARD_DEFAULTS, FORWARD_DEFAULTS, SettingsError, SolverSettings
from .sizes import is_symbol, size, symbols

Dim = int | str


class LayerInputError(ValueError):
    """A compiled layer called with inputs that do not fit its spec (count, names or shapes)."""


def _fmt(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def bind_dims(declared: Mapping[str, tuple[Dim, ...]], tensors: Mapping[str, torch.Tensor],
              spec: str, assumptions: Sequence[tuple] = ()) -> dict[str, int]:
    """Bind the symbolic dimensions of the declared shapes to the sizes of ``tensors``; every use of a
    symbol must agree, every integer must match. Dimensions computed from symbols (``H/2``) are checked
    once every symbol is bound, after the divisibility ``assumptions`` (:func:`check_assumptions`)."""
    dims: dict[str, int] = {}
    where: dict[str, str] = {}
    computed = []
    for name, shape in declared.items():
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise LayerInputError(f"{spec}: input {name!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != len(shape):
            raise LayerInputError(
                f"{spec}: input {name!r} is declared {_fmt(shape)} ({len(shape)} dimensions) "
                f"but got a tensor of shape {_fmt(tensor.shape)}"
            )
        for axis, (want, got) in enumerate(zip(shape, tensor.shape)):
            if isinstance(want, int):
                if want != got:
                    raise LayerInputError(
                        f"{spec}: input {name!r} is declared {_fmt(shape)}: dimension {axis} must be {want}, "
                        f"got shape {_fmt(tensor.shape)}"
                    )
            elif not want.isidentifier():  # computed from symbols (``H/2``): checked below
                computed.append((name, shape, axis, want, tensor.shape))
            elif want in dims and dims[want] != got:
                raise LayerInputError(
                    f"{spec}: dimension {want} is {dims[want]} in {where[want]} but {got} in input {name!r} "
                    f"(shape {_fmt(tensor.shape)})"
                )
            else:
                dims[want] = got
                where.setdefault(want, f"input {name!r}")
    check_assumptions(assumptions, dims, spec)
    for name, shape, axis, want, got in computed:
        if size(want, dims) != got[axis]:
            raise LayerInputError(
                f"{spec}: input {name!r} is declared {_fmt(shape)}: dimension {axis} must be {want} = "
                f"{size(want, dims)} ({_bound(want, dims)}), got shape {_fmt(got)}"
            )
    return dims


def _bound(expr: str, dims: Mapping[str, int]) -> str:
    """The sizes of an expression's symbols, for messages: ``H = 5, W = 4``."""
    names = sorted(symbols(expr))
    return ", ".join(f"{n} = {dims[n]}" for n in names)


def check_assumptions(assumptions: Sequence[tuple], dims: Mapping[str, int], spec: str) -> None:
    """Check the divisibility assumptions the compiler's shape inference relied on (``H % 2 == 0``):
    ``(expr, divisor)`` or ``(expr, divisor, "spec.fpi:3:20")`` with the place of the size that needs it."""
    for item in assumptions:
        expr, divisor = item[0], item[1]
        value = dims[expr] if expr in dims else math.prod(dims[s] for s in expr.split("*"))
        if value % divisor:
            shown = f"{expr} = {value}" if is_symbol(expr) else f"{expr} = {value} ({_bound(expr, dims)})"
            place = f" (required by the size at {item[2]})" if len(item) > 2 else ""
            raise LayerInputError(f"{spec}: {shown} is not divisible by {divisor}{place}")


def concrete(shape: Sequence[Dim], dims: Mapping[str, int]) -> tuple[int, ...]:
    """A declared shape with its symbols replaced by their bound sizes (``H/2`` evaluated)."""
    out = tuple(d if isinstance(d, int) else dims[d] if d in dims else size(d, dims) for d in shape)
    for d, value in zip(shape, out):
        if not isinstance(value, int) or value < 0:
            raise LayerInputError(f"the declared size {d} of a state is {value} ({_bound(d, dims)}), not a size")
    return out


# --------------------------------------------------------------------------- parameters


def _scale(module: nn.Module, init_scale: float | None) -> None:
    if init_scale is not None:
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(init_scale)


def _norm(module: nn.Module, norm: str | None) -> nn.Module:
    if norm == "spectral":
        return nn.utils.parametrizations.spectral_norm(module)
    if norm == "weight":  # w = g v / |v| per output row (channel): torch's weight_norm parametrization
        return nn.utils.parametrizations.weight_norm(module)
    return module


def make_module(kind: str, *args: Any, bias: bool = True, init_scale: float | None = None,
                norm: str | None = None, **options: Any) -> nn.Module:
    """``nn.Linear`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` with PyTorch's default initialisation,
    weight and bias multiplied by ``init_scale``, and ``norm="spectral"`` through PyTorch's
    spectral-norm parametrisation (which then fixes the weight's scale). ``GroupNorm(groups, channels,
    eps=, affine=)`` and ``LayerNorm(dims, eps=, affine=)`` are torch's (weight 1, bias 0)."""
    if kind == "GroupNorm":
        return nn.GroupNorm(*args, eps=options["eps"], affine=options["affine"])
    if kind == "LayerNorm":
        return nn.LayerNorm(*args, eps=options["eps"], elementwise_affine=options["affine"])
    if kind == "MultiheadAttention":  # (dim, heads): torch's, batch first, its parameter names kept
        return nn.MultiheadAttention(*args, bias=bias, batch_first=True)
    if kind == "Embedding":  # Embedding(num, dim): torch's N(0, 1) rows, times init_scale
        module = nn.Embedding(*args)
        _scale(module, init_scale)
        return module
    if kind == "Conv1d":  # the compiler keeps conv2d's (h, w) pairs with a height of 1
        args = (*args[:2], args[2][1])
        options = {k: v[1] for k, v in options.items()}
    cls = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "ConvTranspose2d": nn.ConvTranspose2d, "Conv1d": nn.Conv1d}[kind]
    module = cls(*args, bias=bias, **options)
    _scale(module, init_scale)
    return _norm(module, norm)


def make_tensor(shape: tuple[int, ...], kind: str, args: tuple[float, ...] = ()) -> nn.Parameter:
    """A raw learnable tensor: zeros, ones, fill(value), normal(mean, std) or uniform(lo, hi)."""
    data = torch.empty(shape)
    if kind == "zeros":
        data.zero_()
    elif kind == "ones":
        data.fill_(1.0)
    elif kind == "fill":
        data.fill_(float(args[0]))
    elif kind == "normal":
        data.normal_(float(args[0]), float(args[1]))
    elif kind == "uniform":
        data.uniform_(float(args[0]), float(args[1]))
    else:  # pragma: no cover - the compiler only emits the kinds above
        raise ValueError(f"unknown tensor init {kind!r}")
    return nn.Parameter(data)


def extern_module(layer: nn.Module, name: str, module: Any) -> nn.Module:
    """The module given to ``layer``'s constructor as its extern ``name``, checked (:mod:`fpidsl.runtime.extern`)."""
    from .extern import check_module

    return check_module(layer, name, module)


def extern_handle(layer: nn.Module, name: str):
    """What ``step`` and the adjoint receive for extern ``name``: an :class:`~fpidsl.runtime.extern.ExternHandle`."""
    from .extern import handle

    return handle(layer, name)


def extern_parameters(module: nn.Module) -> torch.Tensor:
    """An extern module's parameters as one flat vector (:func:`fpidsl.runtime.extern.extern_parameters`)."""
    from .extern import extern_parameters as flat

    return flat(module)


def constant_output(value: Any, like: torch.Tensor) -> torch.Tensor:
    """An output that reads no input, state or parameter (``output 2.0``), as a tensor of the states' dtype and
    device (the emitted code computes it as a Python number)."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _tensors(values) -> tuple[torch.Tensor, ...]:
    """The parameter tensors that carry the layer's dtype and device (not an extern's handle, not an empty vector,
    not dropout's integer seeds)."""
    return tuple(v for v in values if isinstance(v, torch.Tensor) and v.numel() and v.is_floating_point())


_CALLS = threading.local()  # per thread: layer -> what its call in progress bound (dims, dropout seeds, device)


def call_in_progress(layer: nn.Module) -> dict:
    """What ``layer``'s call in progress in this thread bound: ``dims`` (the sizes of its symbols), ``seeds``
    (dropout's, once drawn) and ``device``; kept per thread, so that calls of one layer from several threads do not
    read each other's (a batch of 3 met another thread's seeds for 2). Empty outside a call."""
    calls = getattr(_CALLS, "layers", None)
    if calls is None:
        calls = _CALLS.layers = weakref.WeakKeyDictionary()
    return calls.setdefault(layer, {})


def dropout_seeds(layer: nn.Module, batch: Dim) -> torch.Tensor | None:
    """The per-sample seeds of ``layer``'s dropout masks for the call in progress (fpidsl/ir/dropout.py): drawn from
    torch's generator once per call (``batch``: the batch dimension, a symbol or a size), the same for every
    iteration and derivative of that call's solve; None in eval mode (dropout is then the identity). The last
    call's are also ``layer._call_seeds``."""
    if not layer.training:
        return None
    call = call_in_progress(layer)
    n = call.get("dims", {}).get(batch, 1) if isinstance(batch, str) else batch
    seeds = call.get("seeds")
    if seeds is None or seeds.shape[0] != n:
        seeds = call["seeds"] = torch.randint(0, 2**31 - 1, (n,), device=call.get("device"))
        layer.__dict__["_call_seeds"] = seeds  # not a parameter or buffer: no nn.Module.__setattr__
    return seeds


# --------------------------------------------------------------------------- compile=True


def _recording(values) -> bool:
    """Whether autograd records through these values (then the eager code runs: compiled graphs are
    differentiable once, and higher orders must stay exact)."""
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for group in values
        for v in (group if isinstance(group, (tuple, list)) else (group,)))


def _compiled_step(step):
    """``step`` through ``torch.compile`` where nothing is recorded (the forward iterations), eager elsewhere."""
    fast = torch.compile(step, dynamic=True)

    def run(x, *args):
        return step(x, *args) if _recording((x, *args)) else fast(x, *args)

    return run


class _CompiledAdjoint:
    """The emitted backward map through ``torch.compile`` where nothing is recorded (a first-order backward);
    the eager map where a higher derivative is being recorded."""

    def __init__(self, adjoint):
        self.eager = adjoint
        self.fast = {name: torch.compile(getattr(adjoint, name), dynamic=True)
                     for name in ("prepare", "vjp_state", "vjp_args")}

    SELECTIVE_VJP_ARGS = True

    def _call(self, name, first, second, *more):
        fn = getattr(self.eager, name) if _recording((first, second)) else self.fast[name]
        return fn(first, second, *more)

    def prepare(self, x_hat, args):
        return self._call("prepare", x_hat, args)

    def vjp_state(self, saved, c):
        return self._call("vjp_state", saved, c)

    def vjp_args(self, saved, c, needs=None):
        return self._call("vjp_args", saved, c) if needs is None else self._call("vjp_args", saved, c, needs)


# --------------------------------------------------------------------------- the layer


class CompiledLayer(nn.Module):
    """Base of every generated layer class (see the module docstring for what a subclass supplies)."""

    SPEC: str = ""
    INPUTS: dict[str, tuple[Dim, ...]] = {}
    INDEX_INPUTS: dict[str, str] = {}  # the inputs declared ``int`` / ``bool`` (indices), and their kind
    STATES: dict[str, tuple[Dim, ...]] = {}
    ASSUMPTIONS: tuple[tuple[str, int], ...] = ()
    SAMPLEWISE: bool = False  # the compiler sets True when g never mixes samples
    HOIST_BATCHED: tuple[bool, ...] | None = None  # set with ``hoist`` / ``iterate`` when g has state-free parts
    SOLVE: dict[str, Any] = {}
    BACKWARD: dict[str, Any] = {}
    EVAL: dict[str, Any] = {}  # the spec's eval block: settings over SOLVE in eval mode
    EXTERNS: dict[str, tuple[str, str]] = {}  # extern modules: name -> (where the spec declares it, the declaration)
    BATCHED_PARAMS: tuple[bool, ...] = ()  # per param: dimension 0 is the batch (dropout's seeds); () for none
    adjoint: Any = None

    def __init__(self, *, solve: Mapping[str, Any] | None = None,
                 backward: Mapping[str, Any] | None = None, history: bool = False,
                 compile: bool = False,  # noqa: A002 - named like torch.compile
                 eval_solve: Mapping[str, Any] | None = None, warm_start: bool = False) -> None:
        """``solve`` / ``backward``: settings over the spec's blocks; ``eval_solve``: settings over ``solve`` and the
        spec's ``eval`` block for eval mode; ``warm_start``: start each call from the previous fixed point of the same shapes
        (:mod:`fpidsl.runtime.warm_start`)."""
        from .jacobian import LastCall

        super().__init__()
        self.history = history
        self.compiled = compile
        self._step_fn, self._adjoint_obj = (
            (_compiled_step(type(self).step), _CompiledAdjoint(type(self).adjoint)) if compile
            else (type(self).step, type(self).adjoint)
        )
        self._hoisted = None
        if self.HOIST_BATCHED is not None:
            from .fixed_point import Hoisted

            iterate = _compiled_step(type(self).iterate) if compile else type(self).iterate
            self._hoisted = Hoisted(type(self).hoist, iterate, tuple(self.HOIST_BATCHED))
        try:
            self.solve_settings = FORWARD_DEFAULTS.merged(self.SOLVE).merged(solve)
            self.backward_settings = BACKWARD_DEFAULTS.merged(self.BACKWARD).merged(backward)
        except SettingsError as exc:
            raise SettingsError(f"{type(self).__name__}: {exc}") from None
        self._last_call = LastCall()
        self.stats = None
        self.configure(eval_solve=eval_solve, warm_start=warm_start)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A generated class's ``__init__`` (which lists the spec-level options) also takes ``eval_solve`` and
        ``warm_start``, applied by :meth:`configure` after it."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_takes_toolkit_options", False):
            return

        known = [p.name for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY]

        @functools.wraps(init)
        def __init__(self, *args: Any, eval_solve: Mapping[str, Any] | None = None, warm_start: bool = False,
                     **more: Any) -> None:
            unknown = [k for k in more if k not in known]
            if unknown:
                import difflib

                close = difflib.get_close_matches(unknown[0], known, n=1)
                raise TypeError(f"{cls.__name__}() has no option {unknown[0]!r}"
                                f"{f' (did you mean {close[0]!r}?)' if close else ''}; it takes "
                                f"{', '.join(known + ['eval_solve', 'warm_start'])}")
            init(self, *args, **more)
            if eval_solve is not None or warm_start:
                self.configure(eval_solve=eval_solve, warm_start=warm_start)

        __init__._takes_toolkit_options = True
        cls.__init__ = __init__

    def configure(self, *, eval_solve: Mapping[str, Any] | None = None, warm_start: bool = False) -> "CompiledLayer":
        """Set the eval-mode settings (``eval_solve``, over the spec's ``eval`` block, over ``solve``) and warm
        starts; returns the layer."""
        from .warm_start import EvalDerivation, WarmStart

        try:
            self._eval = EvalDerivation(self.solve_settings, eval_solve, self.EVAL or None)
        except SettingsError as exc:
            raise SettingsError(f"{type(self).__name__}: {self._eval_origin(eval_solve)}: {exc}") from None
        self.eval_settings = self._eval.derived
        self.warm = WarmStart(warm_start)
        return self

    def _eval_origin(self, eval_solve: Mapping[str, Any] | None) -> str:
        """Where the eval-mode settings come from, for an error in them (the message blamed ``eval_solve`` where
        none was given: a ``solve`` override against the spec's ``eval`` block)."""
        parts = ["the solve settings"] + (["the spec's eval block"] if self.EVAL else []) + (
            ["eval_solve"] if eval_solve else [])
        return "eval-mode settings (" + " over ".join(reversed(parts)) + ")"

    def _eval_solve_settings(self) -> SolverSettings:
        """The eval-mode settings (:class:`~fpidsl.runtime.warm_start.EvalDerivation`: derived ones follow a later
        ``solve_settings``)."""
        derivation = self.__dict__.get("_eval")
        if derivation is not None:
            try:
                current = derivation.settings(self.solve_settings, self.eval_settings)
            except SettingsError as exc:
                raise SettingsError(f"{type(self).__name__}: {self._eval_origin(derivation.overrides)}: {exc}") \
                    from None
            if current is not self.eval_settings:
                self._keep(eval_settings=current)
        return self.eval_settings

    # hooks a generated class implements
    def parameter_tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    def bind(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """Inputs by position or keyword, exactly as declared."""
        names = list(self.INPUTS)
        spec = f"{type(self).__name__} ({self.SPEC})"
        if len(args) > len(names):
            raise LayerInputError(f"{spec}: takes {len(names)} input(s) ({', '.join(names)}), got {len(args)}")
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in self.INPUTS:
                raise LayerInputError(f"{spec}: no input named {key!r}; inputs: {', '.join(names)}")
            if key in bound:
                raise LayerInputError(f"{spec}: input {key!r} given twice")
            bound[key] = value
        missing = [n for n in names if n not in bound]
        if missing:
            raise LayerInputError(f"{spec}: missing input(s) {', '.join(missing)}")
        return bound

    @torch.compiler.disable  # torch.compile of a model: the layer is one graph break, never traced (docs/PYTORCH.md)
    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        """The layer's output for these inputs. ``init=`` (unless an input is named so) starts the solve there:
        a tensor per state (see :func:`fpidsl.runtime.warm_start.given_start`)."""
        from .fixed_point import fixed_point
        from .stats import Stats
        from .warm_start import given_start

        init = kwargs.pop("init", None) if "init" not in self.INPUTS else None
        spec, values, x0, options = self._begin_call(args, kwargs)
        if init is not None:  # a call-time start wins over the warm start
            x0 = given_start(init, tuple(x0), list(self.STATES), spec)
        else:
            x0 = self.warm.start(tuple(x0), self.backward_settings)
        stats = Stats()
        x_hat = fixed_point(self._step_fn, x0 if len(x0) > 1 else x0[0], *values, stats=stats, **options)
        self._keep(stats=stats)
        states = x_hat if isinstance(x_hat, tuple) else (x_hat,)
        if self._remember_call(states, values):
            self.warm.remember(states, stats.forward.diverged if stats.forward is not None else None)
        return self.outputs(states, *values)

    def _remember_call(self, states: tuple, values: tuple) -> bool:
        """Keep this call's fixed point and values on the layer (``jacobian_penalty``, the last states); under
        torch.func (vmap, grad, jvp) keep nothing, returning False: the call's values exist only inside the
        transform, and kept on the layer they would escape it (a later torch.save, warm start or
        jacobian_penalty would meet them)."""
        from .jacobian import LastCall

        if any(torch._C._functorch.is_functorch_wrapped_tensor(s) for s in states):
            self._keep(_last_states=None, _last_call=LastCall())
            return False
        self._keep(_last_states=tuple(s.detach() for s in states), _last_call=LastCall(tuple(states), values))
        return True

    def _begin_call(self, args: tuple, kwargs: dict) -> tuple[str, tuple, tuple, dict]:
        """What a call solves with: the spec's name for messages, the step's arguments (inputs, then the parameter
        tensors, computed once: a parametrized weight is recomputed on every access), the start, and the
        :func:`fixed_point` options. Binds and checks the inputs, and sets what the step's helpers read for this
        call in this thread (:func:`call_in_progress`: the sizes for externs, the seeds and device for dropout)."""
        from .input_checks import check_dtypes_and_devices

        inputs = self.bind(args, kwargs)
        spec = f"{type(self).__name__} ({self.SPEC})"
        dims = bind_dims(self.INPUTS, inputs, spec, self.ASSUMPTIONS)
        call_in_progress(self).update(dims=dims, seeds=None, device=next((t.device for t in inputs.values()), None))
        self._run_weight_hooks()
        params = tuple(self.parameter_tensors())
        check_dtypes_and_devices(inputs, _tensors(params), spec, self.INDEX_INPUTS)
        values = tuple(inputs[n] for n in self.INPUTS) + params
        x0 = self.init_states(dims, self._float_like(values), *values)
        if self.backward_settings.mode != "unrolled":  # the fixed point does not depend on the start; unrolled's
            x0 = tuple(x.detach() for x in x0)          # output, k steps from it, does (and its gradient through it)
        # per_sample: a map that mixes samples is one problem, judged (forward and backward) over the whole batch;
        # a sample judged alone and held fixed while its neighbours move would give a wrong fixed point and gradient
        options = dict(adjoint=self._adjoint_obj if type(self).adjoint is not None else None, history=self.history,
                       batched=self._batched(params), backward=self.backward_settings, hoisted=self._hoisted,
                       capture="explicit", solve=self.solve_settings if self.training else self._eval_solve_settings(),
                       per_sample=self.SAMPLEWISE)
        return spec, values, x0, options

    def _run_weight_hooks(self) -> None:
        """The layer reads its modules' weights without calling the modules, so their hooks would not run:
        torch.nn.utils.spectral_norm and weight_norm (the hook-based forms) recompute ``weight`` in a forward
        pre-hook, and without it the layer ran with a stale weight and gave ``weight_orig`` no gradient, silently.
        Those two run here, once a call; any other forward hook or pre-hook of a module that is not an extern (an
        extern is called, so its hooks run) is refused. ``torch.nn.utils.parametrizations`` (spectral_norm,
        weight_norm, a custom one) is followed without hooks."""
        for name, module in self._modules.items():
            if module is None or not (module._forward_pre_hooks or module._forward_hooks) or name in self.EXTERNS:
                continue
            for hook in module._forward_pre_hooks.values():
                if not isinstance(hook, NORM_HOOKS):
                    raise RuntimeError(
                        f"{type(self).__name__}: the module {name!r} has a forward pre-hook, which the compiled layer "
                        "does not run (it reads the module's weights without calling it); for a spectral or "
                        "weight norm use torch.nn.utils.parametrizations, which the layer follows")
                hook(module, ())
            if module._forward_hooks:
                raise RuntimeError(f"{type(self).__name__}: the module {name!r} has a forward hook, which the "
                                   "compiled layer does not run (it reads the module's weights without calling it)")

    def _keep(self, **values: object) -> None:
        """Set a call's bookkeeping attributes (none a parameter, buffer or module) without
        ``nn.Module.__setattr__``'s checks for those, which cost more than the rest of a small layer's call
        around the solve (the attributes end in the instance's ``__dict__`` either way)."""
        self.__dict__.update(values)

    def _float_like(self, values: tuple) -> torch.Tensor:
        """The value whose dtype and device the states take: the first floating-point input or parameter (an
        ``int`` input holds indices)."""
        return next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()),
                    values[0] if values else torch.zeros(()))

    def _batched(self, params: tuple) -> tuple[bool, ...] | None:
        """Which arguments have the batch as dimension 0: inputs whose first declared dimension is the
        states' (so the solver can drop finished samples from the work); params never, but dropout's per-sample
        seeds (``BATCHED_PARAMS``) in training mode."""
        if not self.SAMPLEWISE:
            return None
        lead = {shape[0] for shape in self.STATES.values() if shape}
        batched = tuple(bool(shape) and shape[0] in lead and isinstance(shape[0], str)
                        for shape in self.INPUTS.values())
        flags = self.BATCHED_PARAMS or (False,) * len(params)
        return batched + tuple(bool(f) and isinstance(p, torch.Tensor) for f, p in zip(flags, params))

    def correction_outputs(self, *args: torch.Tensor, n_states: int = 2, k: int = 1, tau: float = 1.0,
                           indexing: Sequence[int] | None = None, **kwargs: torch.Tensor) -> list:
        """The layer's outputs at ``n_states`` states of one solve, earliest first, the last at the fixed point
        (fixed-point correction, :mod:`fpidsl.runtime.correction`); weigh their losses with
        :func:`~fpidsl.runtime.correction.correction_loss`."""
        from .correction import fixed_point_states
        from .stats import Stats

        _, values, x0, options = self._begin_call(args, kwargs)
        stats = Stats()
        states = fixed_point_states(self._step_fn, x0 if len(x0) > 1 else x0[0], *values, n_states=n_states,
                                    indexing=indexing, k=k, tau=tau, stats=stats, **options)
        self.stats = stats
        states = [s if isinstance(s, tuple) else (s,) for s in states]
        self._remember_call(states[-1], values)  # jacobian_penalty() after this call: at its fixed point
        return [self.outputs(s, *values) for s in states]

    def jacobian_penalty(self, samples: int = 1, *, reduction: str = "mean",
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """The Hutchinson estimate of ``|dg/dx|_F^2`` at the fixed point of the last forward, differentiable
        (:func:`fpidsl.runtime.jacobian.jacobian_penalty`): add ``gamma * layer.jacobian_penalty()`` to the loss.
        Per sample for a samplewise layer; for one that mixes samples (``SAMPLEWISE`` is False) the batch is one
        problem, as in :meth:`contraction`, and its Jacobian one matrix (``reduction="none"`` gives one value)."""
        from .jacobian import jacobian_penalty

        last = self._last_call
        if last.states is None:
            raise RuntimeError(f"{type(self).__name__}.jacobian_penalty() needs a forward call first (it is "
                               "measured at that call's fixed point), outside torch.func transforms (a call under "
                               "vmap or grad keeps nothing on the layer)")
        adjoint = type(self).adjoint if type(self).adjoint is not None else None
        step = type(self).step
        return jacobian_penalty(step, last.states if len(last.states) > 1 else last.states[0], *last.values,
                                samples=samples, adjoint=adjoint, reduction=reduction, generator=generator,
                                per_sample=self.SAMPLEWISE)

    def contraction(self, *args: torch.Tensor, iters: int = 30, **kwargs: torch.Tensor) -> torch.Tensor:
        """Solve for the fixed point of these inputs, then estimate the contraction factor ‖∂g/∂x‖₂ at it,
        per sample (power iteration with JVPs and VJPs), or of the whole state (one element) where g mixes
        samples (``SAMPLEWISE`` is False); the result is also ``self.stats.contraction``."""
        from .contraction import contraction_factor

        with torch.no_grad():
            self.forward(*args, **kwargs)
        inputs = self.bind(args, kwargs)
        values = tuple(inputs[n] for n in self.INPUTS) + tuple(
            p.detach() if isinstance(p, torch.Tensor) else p for p in self.parameter_tensors())
        x_hat = self._last_states
        factor = contraction_factor(self.step, x_hat if len(x_hat) > 1 else x_hat[0], *values, iters=iters,
                                    per_sample=self.SAMPLEWISE)
        self.stats.contraction = factor
        return factor

    def extra_repr(self) -> str:
        return f"spec={self.SPEC!r}"
