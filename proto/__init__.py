"""The specdraft.v1 API: drafter.proto (the wire's source of truth) and its generated code, the in-process
types both sides speak (interface.py: VerifierUpdate, Feedback, Drafter; tree.py: DraftTree), and wire.py,
which converts between the two."""
