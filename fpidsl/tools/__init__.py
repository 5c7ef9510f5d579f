"""Authoring tools on top of the compiler: the formatter, YAML conversion, the Pygments lexer, the language
server and ``fpidsl explain``. They read the compiler through its public entry points only."""
