from drafter.interface import Drafter, Feedback, VerifierUpdate
from drafter.tree import DraftTree, TreeError

__all__ = ["DraftTree", "Drafter", "Feedback", "TreeError", "VerifierUpdate"]
