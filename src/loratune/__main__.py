"""``python -m loratune`` = the ``loratune`` command."""
from loratune.cli import main

raise SystemExit(main())
