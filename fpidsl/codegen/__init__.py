"""Code generation: graphs → one readable Python module per spec (:mod:`.emit`), loaded by :mod:`.load`."""
