"""``python -m loratune`` = the ``loratune`` command."""
from .cli import main

raise SystemExit(main())
