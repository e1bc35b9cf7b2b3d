"""Regenerate protos/*_pb2*.py from protos/*.proto (needs grpcio-tools, the test extra).

    .venv/bin/python tools/gen_protos.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path = ROOT) -> None:
    from grpc_tools import protoc

    for proto in sorted((ROOT / "protos").glob("*.proto")):
        args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                str(proto.relative_to(ROOT))]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate()
