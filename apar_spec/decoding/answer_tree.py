"""The APAR answer tree: the shared data shape of restructuring, training and reassembly.

An APAR answer is a tree of *branches*. Each branch owns a piece of text; at some
character offsets of that text it emitted ``[Fork]`` and a *child* branch was
spawned there. The child's text is written after a forced ``[Child]`` token.

Reassembly is depth-first: a branch's text up to its first fork, then that
child's full (recursively reassembled) text, then the branch's text up to the
next fork, and so on. Reassembly is plain concatenation, so the restructuring
rules put the separators where the original answer had them: the parent keeps
``"1. Title:"`` and the continuation ``"\\n2. Title:"``; the child keeps
``" details"`` (leading space included). See ``apar_spec.training.restructure``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ForkPoint:
    """A ``[Fork]`` emitted by a branch after ``offset`` characters of its own text."""

    offset: int
    child: AnswerTree


@dataclass
class AnswerTree:
    """One branch: its own text and the children it forked (sorted by offset)."""

    text: str
    forks: list[ForkPoint] = field(default_factory=list)

    def segments(self) -> list[str]:
        """The branch's own text cut at its fork offsets: ``len(forks) + 1`` pieces."""
        cuts = [0] + [f.offset for f in self.forks] + [len(self.text)]
        return [self.text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def reassemble(self) -> str:
        """Depth-first reading order: own segment, child's text, next own segment, ..."""
        pieces: list[str] = []
        for segment, fork in zip(self.segments(), self.forks + [None]):
            pieces.append(segment)
            if fork is not None:
                pieces.append(fork.child.reassemble())
        return "".join(pieces)

    def num_branches(self) -> int:
        return 1 + sum(f.child.num_branches() for f in self.forks)

    def depth(self) -> int:
        """Fork nesting depth: 0 for a tree that never forks."""
        return max((1 + f.child.depth() for f in self.forks), default=0)

    def to_dict(self) -> dict:
        return {"text": self.text, "forks": [{"offset": f.offset, "child": f.child.to_dict()} for f in self.forks]}

    @classmethod
    def from_dict(cls, d: dict) -> AnswerTree:
        return cls(d["text"], [ForkPoint(int(f["offset"]), cls.from_dict(f["child"])) for f in d.get("forks", [])])
