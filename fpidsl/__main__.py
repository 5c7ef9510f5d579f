"""``python -m fpidsl`` is the ``fpidsl`` command."""
import sys

from .cli import main

sys.exit(main())
