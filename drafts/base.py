"""The speculator contract lives in the core (``apar_spec.decoding.speculator``); re-exported here."""

from apar_spec.decoding.speculator import BranchView, Outcome, Proposal, ServingSpeculator, Speculator

__all__ = ["BranchView", "Outcome", "Proposal", "ServingSpeculator", "Speculator"]
