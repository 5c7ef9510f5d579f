"""fpidsl: a language for differentiable fixed-point layers, compiled to PyTorch."""

__version__ = "0.1.0"
