"""Speculators (draft LM, n-gram, heads, unions) and the draft registry.

Importing this package registers the registry as the core's draft catalog
(``apar_spec.decoding.speculator.register_catalog``), so ``generate(draft="name")``
resolves names without the core importing ``drafts/``."""

from apar_spec.decoding.speculator import (
    BranchView,
    DraftCatalog,
    DraftInfo,
    Outcome,
    Proposal,
    Speculator,
    register_catalog,
)


def resolve_speculator(draft, target, tokenizer) -> Speculator:
    """A speculator from a speculator object, a loaded model, or a registry name / path."""
    from apar_spec.drafts.registry import resolve

    return resolve(draft, target, tokenizer)


def describe(name: str) -> DraftInfo:
    """The core's view of a registry entry (``ValueError`` for an unknown name)."""
    from apar_spec.drafts.registry import lookup

    e = lookup(name)
    return DraftInfo(e.name, e.kind, e.weights, e.acceptance_length, e.acceptance_k)


register_catalog(DraftCatalog(resolve_speculator, describe))


__all__ = ["BranchView", "Outcome", "Proposal", "Speculator", "resolve_speculator"]
