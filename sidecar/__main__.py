"""`python -m sidecar`: the same as the `wasm-sidecar` command."""

import sys

from .cli import main

sys.exit(main())
