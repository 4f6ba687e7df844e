"""Speculators (draft LM, n-gram) and the draft registry."""

from apar_spec.speculator import BranchView, Outcome, Proposal, Speculator


def resolve_speculator(draft, target, tokenizer) -> Speculator:
    """A speculator from a speculator object, a loaded model, or a registry name / path."""
    from apar_spec.drafts.registry import resolve

    return resolve(draft, target, tokenizer)


__all__ = ["BranchView", "Outcome", "Proposal", "Speculator", "resolve_speculator"]
