"""`python -m data_prep ...`: see data_prep/prepare.py."""
from data_prep.prepare import main

raise SystemExit(main())
