"""Compiler passes, one concern per module; :mod:`fpidsl.passes.pipeline` chains them."""
