"""`python -m adaptive_sched` is the `adaptive-sched` command."""
from adaptive_sched.cli import main

raise SystemExit(main())
