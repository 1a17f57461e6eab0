"""`python -m ssn_runtime.organism build ...`: the child process of a pinned organism build."""

from .build import main

raise SystemExit(main())
