"""Front-ends: ``.fpi`` text (lark grammar) and YAML, both producing :mod:`fpidsl.frontend.ast`."""
