"""The generated gRPC modules in protos/ match the .proto files."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from gen_protos import generate

    generate(tmp_path)
    for fresh in sorted((tmp_path / "protos").glob("*.py")):
        committed = ROOT / "protos" / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run tools/gen_protos.py"
