"""`python -m nexus` runs the command-line interface."""

from nexus.cli import main

raise SystemExit(main())
