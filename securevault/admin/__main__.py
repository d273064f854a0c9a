"""C{python -m securevault.admin}: the same as C{securevault-admin}."""

from securevault.admin.cli import main

raise SystemExit(main())
