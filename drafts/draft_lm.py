"""Draft-LM speculator: a small causal LM on the same token-tree machinery as the target.

The draft keeps its own ``TreeCache`` mirroring the committed token tree: for
every branch, the draft nodes of the branch's tokens it has already computed.
Each ``propose`` costs exactly one draft forward per depth of the asked tree
(``k`` for a chain), whatever the number of branches: the first forward catches
every branch up on its newly committed tokens (the pending token included) and
yields the depth-1 candidates (top-k); each further forward feeds every branch's
drafts of the previous depth that have children in the shape. ``observe`` keeps
the draft nodes of the accepted path; the rest become garbage, dropped lazily.
"""

from __future__ import annotations

from typing import Optional

import torch

from apar_spec.decoding.draft_tree import TreeShape, chain
from apar_spec.decoding.sampling import SamplingConfig, to_probs
from apar_spec.decoding.speculator import BranchView, Outcome, Proposal
from apar_spec.decoding.tree_cache import TreeCache

from .vocab import DraftVocab

Key = tuple[int, int]  # (request, branch)


class DraftModelSpeculator:
    name = "draft-lm"

    def __init__(
        self,
        model,
        name: Optional[str] = None,
        mask_ids: tuple[int, ...] = (),
        logits_processor=None,
        vocab: Optional[DraftVocab] = None,
    ):
        """``mask_ids``: tokens the target never samples (``[Child]``); drafting them is waste.
        ``logits_processor``: applied to the draft's logits with the branch's context, as the
        decoder applies it to the target's (so a draft can follow the same steering).
        ``vocab``: propose only these token ids, through an LM head cut to their rows
        (``drafts/vocab.py``); None = the draft's whole vocabulary."""
        self.model = model
        self.vocab = vocab
        self.head = vocab.head(model.get_output_embeddings()) if vocab is not None else None
        self.logits_processor = logits_processor
        if name:
            self.name = name
        self.mask_ids = mask_ids
        self.tc: Optional[TreeCache] = None
        self._forwards = 0

    @property
    def forwards(self) -> int:
        return self._forwards

    def reset(self, num_requests: int, vocab_size: int, generator: Optional[torch.Generator] = None) -> None:
        self.tc = TreeCache(self.model, num_requests)
        self.row: dict[int, int] = {i: i for i in range(num_requests)}  # request index -> draft cache row
        self.vocab_size = vocab_size
        if self.vocab is not None:  # where the reduced logits go in the target's vocabulary, once per run
            keep = self.vocab.ids < vocab_size  # [N]
            self._reduced_cols, self._reduced_ids = keep.nonzero()[:, 0], self.vocab.ids[keep]
        self.generator = generator
        self.prompt_last: dict[int, int] = {}  # request -> draft node of its last prompt token
        self.nodes: dict[Key, list[int]] = {}  # draft nodes of the branch's tokens[:len]
        self.drafted: dict[Key, list[int]] = {}  # draft nodes fed for d_1..d_{k-1} this step
        self.grown = 0

    # ------------------------------------------------------------ serving
    def admit(self, indices: list[int]) -> None:
        """Requests join the batch: one empty draft-cache row each (their prompt is fed lazily
        at their first ``propose``, like every request's)."""
        first = len(self.tc.rows)
        self.tc.add_rows(TreeCache(self.model, len(indices)))
        for j, index in enumerate(indices):
            self.row[index] = first + j

    def release(self, indices: list[int]) -> None:
        """Requests left the batch: drop their rows and every state keyed on them."""
        gone = {self.row.pop(i) for i in indices if i in self.row}
        if not gone:
            return
        keep = [row for row in range(len(self.tc.rows)) if row not in gone]
        if keep:
            self.tc.drop_rows(keep)
        else:
            self.tc = TreeCache(self.model, 0)
        new_row = {old: new for new, old in enumerate(keep)}
        self.row = {i: new_row[r] for i, r in self.row.items()}
        dropped = set(indices)
        self.prompt_last = {i: n for i, n in self.prompt_last.items() if i not in dropped}
        self.nodes = {key: n for key, n in self.nodes.items() if key[0] not in dropped}
        self.grown = min(self.grown, self.tc.num_slots)

    # ------------------------------------------------------------ propose
    @torch.inference_mode()
    def propose(self, views: list[BranchView], sampling: SamplingConfig) -> Proposal:
        """Draft each view's tree shape depth by depth: ONE draft forward per depth for the
        frontier nodes of all branches; the children of a node are the draft's top-k there
        (greedy). Sampled drafting proposes a chain of the shape's depth (its draws carry
        probabilities; the decoder verifies sampled drafts as chains, exactly)."""
        tc = self.tc
        n = len(views)
        shapes = [v.shape if v.shape is not None else chain(max(1, v.k)) for v in views]
        if not sampling.greedy:
            shapes = [chain(s.depth) for s in shapes]
        tokens: list[list[int]] = [[] for _ in views]
        parents: list[list[int]] = [[] for _ in views]
        probs: list[list[torch.Tensor]] = [[] for _ in views]
        index: list[dict[int, int]] = [{} for _ in views]  # per view: shape node -> proposal index
        ctx: list[dict[int, list[int]]] = [{-1: list(v.context)} for v in views]  # shape node -> its context
        reads: list[dict[int, int]] = [{-1: self._catch_up(v)} for v in views]  # shape node -> draft node to read
        self.drafted = {(v.request, v.branch): {} for v in views}  # proposal index -> fed draft node
        max_depth = max((s.depth for s in shapes), default=0)
        for depth in range(1, max_depth + 1):
            if depth > 1:  # feed the previous depth's drafts that have children in the shape
                for i, v in enumerate(views):
                    for node in _at_depth(shapes[i], depth - 1):
                        if node in index[i] and shapes[i].children(node):
                            parent = shapes[i].parents[node]
                            if parent not in reads[i]:
                                continue
                            j = index[i][node]
                            reads[i][node] = tc.add(self.row[v.request], tokens[i][j], reads[i][parent])
                            self.drafted[(v.request, v.branch)][j] = reads[i][node]
            if not any(tc.rows[r].scheduled for r in range(len(tc.rows))):
                break
            result = tc.forward(head=self.head)
            self._forwards += 1
            frontier = [
                (i, node)
                for i in range(n)
                for node in ([-1] if depth == 1 else _at_depth(shapes[i], depth - 1))
                if node in reads[i] and shapes[i].children(node) and (node == -1 or node in index[i])
            ]
            if not frontier:
                break
            logits = torch.stack(
                [result.of(self.row[views[i].request], [reads[i][node]])[0] for i, node in frontier]
            ).float()  # [m, V_draft or N]
            logits = self._fit_vocab(logits)  # [m, V] (reduced vocabulary: also [m, V], -inf outside it)
            if self.logits_processor is not None:
                for row, (i, node) in enumerate(frontier):
                    logits[row] = self.logits_processor(ctx[i][node], logits[row])
            for t in self.mask_ids:
                logits[:, t] = float("-inf")
            if sampling.greedy:
                width = max(len(shapes[i].children(node)) for i, node in frontier)
                top = logits.topk(min(width, logits.shape[-1]), dim=-1).indices.tolist()  # [m, width]
                picks = [
                    [(c, top[row][r]) for r, c in enumerate(shapes[i].children(node))]
                    for row, (i, node) in enumerate(frontier)
                ]
            else:
                p = to_probs(logits, sampling)  # [m, V]
                drawn = torch.multinomial(p, 1, generator=self.generator)[:, 0].tolist()  # [m]
                picks = [[(shapes[i].children(node)[0], drawn[row])] for row, (i, node) in enumerate(frontier)]
                for row, (i, _) in enumerate(frontier):
                    probs[i].append(p[row])
            for row, (i, node) in enumerate(frontier):
                for child, tok in picks[row]:
                    index[i][child] = len(tokens[i])
                    parents[i].append(-1 if node == -1 else index[i][node])
                    tokens[i].append(int(tok))
                    ctx[i][child] = ctx[i][node] + [int(tok)]
        out_probs = [torch.stack(p) if p else None for p in probs] if not sampling.greedy else [None] * n
        return Proposal(tokens, out_probs, parents)

    @torch.inference_mode()
    def catch_up(self, views: list[BranchView]) -> None:
        """A step without drafts (load-adaptive speculation): feed every branch's committed tokens
        in one draft pass, so the mirror stays level with the tree (a child's parent is always
        there) and drafting can resume at any later step."""
        self.drafted = {(v.request, v.branch): {} for v in views}
        for v in views:
            self._catch_up(v)
        if any(row.scheduled for row in self.tc.rows):
            self.tc.forward(head=self.head)
            self._forwards += 1

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[..., V_draft]`` over the target's vocabulary width (embedding padding may differ).

        A reduced vocabulary's ``[..., N]`` logits are scattered into ``-inf`` everywhere
        else: one ``[m, V]`` write per depth, far cheaper than the ``[d, V]`` head it replaces,
        and every later rule (mask, processor, top-k, sampling) then sees target ids."""
        v = self.vocab_size
        if self.vocab is not None:
            full = logits.new_full((*logits.shape[:-1], v), float("-inf"))
            full[..., self._reduced_ids.to(logits.device)] = logits[..., self._reduced_cols.to(logits.device)]
            return full
        if logits.shape[-1] == v:
            return logits
        if logits.shape[-1] > v:
            return logits[..., :v]
        pad = logits.new_full((*logits.shape[:-1], v - logits.shape[-1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def _catch_up(self, v: BranchView) -> int:
        """Schedule the branch's committed tokens the draft has not computed; return its tip node."""
        tc = self.tc
        key = (v.request, v.branch)
        if v.request not in self.prompt_last:
            # a request is first seen through its root branch (the only branch at its first step)
            assert v.parent is None, "a request's first view must be its root branch"
            prompt = v.context[: len(v.context) - len(v.tokens)]
            self.prompt_last[v.request] = tc.add_chain(self.row[v.request], prompt, -1)[-1]
        nodes = self.nodes.setdefault(key, [])
        if nodes:
            anchor = nodes[-1]
        elif v.parent is None:
            anchor = self.prompt_last[v.request]
        else:
            anchor = self._parent_fork_node(v)
        nodes.extend(tc.add_chain(self.row[v.request], v.tokens[len(nodes) :], anchor))
        return nodes[-1]

    def _parent_fork_node(self, v: BranchView) -> int:
        """The draft node of the parent's [Fork]; catches the parent up from the child's context if needed."""
        pkey = (v.request, v.parent)
        pnodes = self.nodes.setdefault(pkey, [])
        need = v.fork_index + 1
        if len(pnodes) < need:
            # the parent committed its [Fork] (and maybe finished) since the draft last saw it:
            # its tokens up to the fork are the part of the child's context just before the child's own.
            prefix = v.context[len(v.context) - len(v.tokens) - need : len(v.context) - len(v.tokens)]
            pnodes.extend(self.tc.add_chain(self.row[v.request], prefix[len(pnodes) :], pnodes[-1]))
        return pnodes[v.fork_index]

    # ------------------------------------------------------------ observe
    def observe(self, outcome: Outcome) -> None:
        """Keep the draft nodes of the accepted path (those fed this step; a leaf is fed at the next catch-up)."""
        paths = outcome.paths or [list(range(a)) for a in outcome.accepted]
        for v, path in zip(outcome.views, paths):
            key = (v.request, v.branch)
            fed = self.drafted.get(key, {})
            for j in path:
                if j not in fed:
                    break
                self.nodes[key].append(fed[j])
        self.drafted = {}
        self._maybe_compact(outcome.views)

    def _maybe_compact(self, views: list[BranchView]) -> None:
        """Drop draft slots no active branch can see, once they are a quarter of the cache."""
        tc = self.tc
        if tc.num_slots < 64 or tc.num_slots < self.grown + 64:
            return
        live: list[set[int]] = [set() for _ in tc.rows]
        for v in views:
            n = self.nodes[(v.request, v.branch)][-1]
            row = tc.rows[self.row[v.request]]
            seen = live[self.row[v.request]]
            while n >= 0 and n not in seen:
                seen.add(n)
                n = row.parent[n]
        # Committed nodes all stay (a queued child may need a finished parent's prefix);
        # what goes is the rejected drafts.
        for (req, _branch), nodes in self.nodes.items():
            row = self.row[req]
            live[row].update(n for n in nodes if tc.rows[row].slot_of[n] >= 0)
        if tc.garbage(live) >= 0.25 * tc.num_slots:
            tc.compact(live)
        self.grown = tc.num_slots


def _at_depth(shape: TreeShape, depth: int) -> list[int]:
    """Shape nodes at ``depth`` (1 = first draft), in layout order."""
    return [i for i, d in enumerate(shape.depths) if d == depth]
