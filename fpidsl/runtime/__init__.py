"""The fpidsl runtime: the differentiable fixed-point operator, its solvers and stats.

Compiled layers import only this package and torch; it also works on its own (``fixed_point``, ``FixedPoint``).
"""
from .adjoint import Adjoint as Adjoint
from .adjoint import AdjointMap as AdjointMap
from .adjoint import AutogradAdjoint as AutogradAdjoint
from .fixed_point import FixedPoint as FixedPoint
from .fixed_point import fixed_point as fixed_point
from .settings import BACKWARD_DEFAULTS as BACKWARD_DEFAULTS
from .settings import FORWARD_DEFAULTS as FORWARD_DEFAULTS
from .settings import SETTING_KEYS as SETTING_KEYS
from .settings import SettingsError as SettingsError
from .settings import SolverSettings as SolverSettings
from .correction import correction_loss as correction_loss
from .correction import fixed_point_states as fixed_point_states
from .jacobian import jacobian_penalty as jacobian_penalty
from .solvers import Anderson as Anderson
from .solvers import Broyden as Broyden
from .solvers import Picard as Picard
from .stats import ConvergenceError as ConvergenceError
from .stats import ConvergenceWarning as ConvergenceWarning
from .stats import SolveStats as SolveStats
from .stats import Stats as Stats
