"""C{python -m securevault.client}: the same as C{securevault-client}."""

from securevault.client.cli import main

raise SystemExit(main())
