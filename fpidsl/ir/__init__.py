"""The intermediate representation: one checked, shape-inferred graph per layer."""
from .graph import OPS as OPS
from .graph import Assumption as Assumption
from .graph import GraphLintError as GraphLintError
from .graph import LayerGraph as LayerGraph
from .graph import ModuleSpec as ModuleSpec
from .graph import StateInfo as StateInfo
from .graph import TensorInit as TensorInit
from .primitives import PRIMITIVES as PRIMITIVES
from .primitives import Primitive as Primitive
from .shapes import DimExpr as DimExpr
