"""The .proto files and the Python modules generated from them (tools/gen_protos.py)."""
