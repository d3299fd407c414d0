"""`python -m training <command>`: see training/cli.py or `python -m training --help`."""

import sys

from training.cli import main

sys.exit(main())
