"""proto/model-format.md agrees with the code: the limits table and the v2 magic."""

import re
from pathlib import Path

from lattice.learn import modelfile

PROTO = Path(__file__).resolve().parents[3] / "proto"


def test_the_limits_table_is_the_code():
    text = (PROTO / "model-format.md").read_text()
    table = {k: int(v) for k, v in re.findall(r"^\| `([A-Z_]+)` \| (\d+) \|$", text, re.M)}
    expected = {n for n in dir(modelfile) if n.startswith("MAX_")} | {"PIECE_BYTES"}
    assert set(table) == expected
    assert table == {n: getattr(modelfile, n) for n in table}
    assert "lattice-model/2\\n" in text and modelfile.MANIFEST_MAGIC == b"lattice-model/2\n"
