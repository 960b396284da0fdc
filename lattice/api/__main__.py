"""`python -m lattice.api > proto/local-rpc.json` regenerates the exported schema."""

import sys

from lattice.api.methods import schema_json

sys.stdout.write(schema_json())
