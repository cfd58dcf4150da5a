"""`python -m lottery_ext` is the same as the `lottery-ext` command."""

from .cli import main

raise SystemExit(main())
