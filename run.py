#!/usr/bin/env python3
"""Sample from a Grok checkpoint: `python run.py "a prompt"` (see `--help`)."""
import sys

if __name__ == "__main__":
    try:
        from grok.cli import main   # light: jax is imported once the flags are checked
    except KeyboardInterrupt:       # Ctrl-C before main() took over the signal
        sys.exit(130)
    sys.exit(main())
