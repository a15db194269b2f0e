"""`python -m chorus …` is the same command as `chorus …` (so `torchrun -m chorus` works)."""
import sys

from chorus.cli import main

sys.exit(main())
