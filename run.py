#!/usr/bin/env python3
"""Sample from a Grok checkpoint: `python run.py "a prompt"` (see `--help`)."""
import sys

from grok.cli import main

if __name__ == "__main__":
    sys.exit(main())
