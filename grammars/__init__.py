"""The grammars of the fpidsl language, shipped inside the package as ``fpidsl.grammars``."""
