"""The speculator contract lives in the core (``apar_spec.speculator``); re-exported here."""

from apar_spec.speculator import BranchView, Outcome, Proposal, ServingSpeculator, Speculator

__all__ = ["BranchView", "Outcome", "Proposal", "ServingSpeculator", "Speculator"]
