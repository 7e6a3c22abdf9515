"""The specdraft.v1 wire API: drafter.proto (the source of truth), its generated code, and wire.py."""
