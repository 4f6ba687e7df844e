"""The token-tree decoder: plain AR, APAR, speculation and APAR+speculation in ONE loop.

Each *step* is one round of four named phases (DESIGN.md):

1. ``propose`` - the speculator (if any) drafts a chain or a small tree (the shape
   of ``DecodeOptions.tree``) for every active branch;
2. ``verify``  - ONE target forward over each active branch's pending token + its
   draft nodes, for every request of the batch, with the tree mask;
3. ``accept``  - per branch, the target's (rule-masked) distribution at every fed
   node decides which root-to-leaf path of drafts survives (the longest the target
   agrees with) and which bonus token follows;
4. ``commit``  - accepted tokens + bonus join the branch; a ``[Fork]`` among them
   spawns a child, EOS ends the branch, dead KV is dropped lazily.

Plain decoding is the round with no drafts (acceptance length 1.0); plain AR is
APAR with ``[Fork]`` disabled. Glossary: *pending* = a branch's newest committed
token, whose KV is not computed yet (it is fed at the next verify).

Scheduling never changes tokens: fork rules depend only on a branch's own
history (level, forks so far, previous token, own length), the live-branch bound
only delays children, and the per-request ``max_new_tokens`` (counted over all
branches) keeps the tokens plain APAR keeps, by their APAR time (``clock``), however
far a speculator let each branch run. Branch ids are creation order inside the
loop; results and streams number branches in plain APAR's order (``output_branches``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from apar_spec import clock
from apar_spec.speculator import BranchView, Outcome, Proposal, Speculator
from apar_spec.options import DecodeOptions
from apar_spec.draft_tree import TreeShape, chain, parse_tree
from apar_spec.sampling import SamplingConfig, rejection_accept, sample, to_probs, tree_accept_path
from apar_spec.restructure import title_key
from apar_spec.router import gate_of
from apar_spec.tokens import AparTokens
from apar_spec.tree_cache import TreeCache

NEG_INF = float("-inf")


# ------------------------------------------------------------------- state
@dataclass(frozen=True)
class Fence:
    """Whether an answer's text is inside a ``` block, scanned token by token.

    ``ticks`` counts the backticks that end the text so far (a fence may be split over
    tokens: "``" then "`"); three in a row toggle ``inside``."""

    inside: bool = False
    ticks: int = 0

    def after(self, text: Optional[str]) -> "Fence":
        """The state after a token with this text (``None``: a token without backticks)."""
        if text is None:
            return Fence(self.inside, 0) if self.ticks else self
        inside, ticks = self.inside, self.ticks
        for ch in text:
            ticks = ticks + 1 if ch == "`" else 0
            if ticks == 3:
                inside, ticks = not inside, 0
        return Fence(inside, ticks)


@dataclass
class Branch:
    id: int
    parent: Optional[int]
    fork_index: Optional[int]  # index in the parent's tokens of its [Fork]
    level: int  # fork nesting level (root 0)
    tokens: list[int] = field(default_factory=list)  # committed; children start with the forced [Child]
    nodes: list[int] = field(default_factory=list)  # target-cache nodes of tokens[:len(nodes)]
    forks: int = 0
    # "eos" | "length" (per-branch cap) | "budget" (request cap) | "context" | "depth" (asked to fork at the cap)
    # | "repeat" (asked to fork after a title it had forked after: DecodeOptions.repeated_title)
    finish: Optional[str] = None
    active: bool = False  # False while queued or finished
    k: int = 0  # draft length asked for next step
    is_child: bool = False
    logits: list = field(default_factory=list)  # raw logits per sampled token (only with record_logits)
    hidden: Optional[torch.Tensor] = None  # [hidden] target state at the node that chose the pending token (heads)
    # code-fence state after the branch's first fence_at tokens (Decoder.fence_of)
    fence: Fence = field(default_factory=Fence)
    fence_at: int = 0
    # The APAR clock (apar_spec.clock): token i has time base + i; order is plain APAR's
    # commit order; sampled counts sampled tokens, those a finish rule cut included.
    base: int = 0
    order: tuple = clock.ROOT_ORDER
    sampled: int = 0
    cut: list[int] = field(default_factory=list)  # what a finish rule cut (restored if the budget ends earlier)
    dropped: bool = False  # its [Fork] fell after the budget's cut: not part of the answer

    @property
    def generated(self) -> int:
        """Sampled tokens (the forced [Child] is not one)."""
        return len(self.tokens) - (1 if self.is_child else 0)


@dataclass
class StepCounters:
    """Per-request measurements (DESIGN.md, 'Metrics every run reports')."""

    target_steps: int = 0
    live_kv: list[int] = field(default_factory=list)  # after each step
    attended_keys: int = 0
    branch_steps: int = 0  # branch-steps that were verified (for acceptance length)
    accepted: int = 0  # accepted draft tokens
    drafted: int = 0
    accept_plus_bonus: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position: how many were drafted
    accepted_at: list[int] = field(default_factory=list)  # per draft position: how many were accepted
    # Per (depth - 1, rank) of draft-tree nodes: verified = the node's parent path was accepted
    # (so the node had its chance); accepted = the target's token there was the node's token.
    # accepted / verified is the conditional acceptance p(d, r) the cost model uses.
    depth_rank_verified: list[list[int]] = field(default_factory=list)
    depth_rank_accepted: list[list[int]] = field(default_factory=list)


@dataclass
class Request:
    index: int  # position in the batch, stable (speculators key their state on it)
    row: int  # current cache row (changes when finished requests leave the batch)
    prompt: list[int]
    prompt_nodes: list[int]
    branches: list[Branch]
    limit: int  # the request's token budget over all branches (max_new_tokens)
    budget: int = 0  # tokens left under it (a bound for KV projections: limit - sampled, >= 0)
    cutoff: Optional[tuple] = None  # key of the limit-th token in APAR order, once that many were sampled
    # the fork router's p(list) for this prompt (None: no router in use) and whether it
    # gated the request: no [Fork] anywhere in it (DecodeOptions.fork_gate)
    p_list: Optional[float] = None
    forks_gated: bool = False
    queue: deque = field(default_factory=deque)  # branch ids waiting for a live slot
    counters: StepCounters = field(default_factory=StepCounters)

    @property
    def done(self) -> bool:
        return not self.queue and not any(b.active for b in self.branches)

    def context(self, b: Branch, upto: Optional[int] = None) -> list[int]:
        """prompt + ancestors' tokens up to the fork + b.tokens[:upto]."""
        own = b.tokens if upto is None else b.tokens[:upto]
        if b.parent is None:
            return self.prompt + own
        return self.context(self.branches[b.parent], b.fork_index + 1) + own


@dataclass
class DecodeResult:
    """Raw outcome of one request: its branches and counters (the API turns it into a Generation)."""

    prompt: list[int]
    branches: list[Branch]
    counters: StepCounters
    wall_time_s: float
    draft_forwards: int
    p_list: Optional[float] = None  # the fork router's score (None: no router in use)
    forks_gated: bool = False


# ------------------------------------------------------------------- rules
@dataclass
class RuleState:
    """What the fork rules need to know about a branch at one position."""

    prev: int  # the token whose logits are being processed
    forks: int
    generated: int  # sampled tokens so far
    fence: Fence  # code-fence state of the answer text up to and including ``prev``


class Decoder:
    """Decodes a batch of prompts (token ids) with one target model and an optional speculator."""

    def __init__(
        self,
        model,
        opts: DecodeOptions,
        apar: Optional[AparTokens],
        fork_enabled: bool,
        eos_ids: set[int],
        speculator: Optional[Speculator] = None,
        record_logits: bool = False,
        on_step: Optional[Callable[[list["Request"], TreeCache], None]] = None,
    ):
        """``record_logits`` keeps, per branch, the raw target logits that predicted each
        sampled token (for equality tests); ``on_step`` is called after every step."""
        self.model = model
        self.record_logits = record_logits
        self.on_step = on_step
        self.opts = opts
        self.apar = apar
        self.fork_enabled = fork_enabled and apar is not None
        # backtick texts the code-fence rule tracks; empty where the rule cannot ban a fork
        self.fence_texts = apar.backtick_texts if self.fork_enabled and not opts.fork_in_code else {}
        # token texts the repeated-title rule reads; empty where the rule is off
        self.title_texts = apar.token_texts if self.fork_enabled and opts.repeated_title == "end" else ()
        self.eos_ids = eos_ids
        self.spec = speculator
        self.sampling = SamplingConfig(opts.temperature, opts.top_p, opts.top_k)
        self.generator: Optional[torch.Generator] = None
        if not self.sampling.greedy:
            self.generator = torch.Generator(device=model.device)
            self.generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
        self.branch_cap = opts.max_branch_tokens or opts.max_new_tokens
        self.max_pos = getattr(model.config, "max_position_embeddings", None)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        if isinstance(opts.tree, str) and opts.tree.strip() == "auto":
            raise ValueError("tree='auto' must be resolved by the cost model before decoding; give a shape such as 'topk:2x3'")
        self.shape: Optional[TreeShape] = None if opts.tree is None else parse_tree(opts.tree)
        self.wants_hidden = bool(getattr(speculator, "needs_hidden", False))
        # (router, threshold) where prompts are routed, else None (DecodeOptions.fork_gate)
        self.gate = gate_of(model, opts.fork_gate) if self.fork_enabled else None
        self.requests_by_index: dict[int, Request] = {}

    # ------------------------------------------------------------ the loop
    def run(self, prompts: list[list[int]]) -> list[DecodeResult]:
        start = time.perf_counter()
        draft_forwards0 = self.spec.forwards if self.spec is not None else 0
        self.requests_by_index = {}
        requests, tc = self.prefill(prompts)
        if self.spec is not None:
            self.spec.reset(len(requests), vocab_size=self.vocab_size, generator=self.generator)
        live = self.drop_finished(tc, list(requests))
        while live:
            self.step(tc, live)
            live = self.drop_finished(tc, live)
        wall = time.perf_counter() - start
        draft_forwards = (self.spec.forwards if self.spec is not None else 0) - draft_forwards0
        return [
            DecodeResult(r.prompt, output_branches(r.branches), r.counters, wall, draft_forwards, r.p_list, r.forks_gated)
            for r in requests
        ]

    def outcome(self, live: list[Request], views: list[BranchView], paths: list[list[int]]) -> Outcome:
        by_index = {r.index: r for r in live}
        hidden = [by_index[v.request].branches[v.branch].hidden for v in views] if self.wants_hidden else []
        return Outcome(views, [len(p) for p in paths], paths, hidden)

    def step(self, tc: TreeCache, live: list[Request]) -> None:
        """One round over every active branch of the ``live`` requests (rows of ``tc``).

        ``run`` loops it over a fixed batch; the serving engine calls it between
        admitting and retiring requests (continuous batching)."""
        self.activate(live)
        views = self.views(live)
        proposal = self.propose(views)
        fed, result = self.verify(tc, live, views, proposal)
        paths = self.accept_and_commit(live, views, proposal, fed, result)
        if self.spec is not None:
            self.spec.observe(self.outcome(live, views, paths))
        for r in live:
            self.apply_budget(r)
        self.collect_garbage(tc, live)
        if self.on_step is not None:
            self.on_step(live, tc)

    def drop_finished(self, tc: TreeCache, live: list[Request]) -> list[Request]:
        """Finished requests leave the batch (their cache rows go)."""
        still = [i for i, r in enumerate(live) if not r.done]
        if len(still) == len(live):
            return live
        if still:
            tc.drop_rows(still)
        live = [live[i] for i in still]
        for row, r in enumerate(live):
            r.row = row
        return live

    # ------------------------------------------------------------ prefill
    def prefill(
        self, prompts: list[list[int]], indices: Optional[list[int]] = None, budgets: Optional[list[int]] = None
    ) -> tuple[list[Request], TreeCache]:
        """Compute the prompts' KV in one forward and sample each root branch's first token.

        ``indices``: the requests' stable ids (default 0..n-1); ``budgets``: per-request
        token budgets (default ``max_new_tokens``). The serving engine passes both and
        merges the returned cache into its running batch (``TreeCache.add_rows``)."""
        tc = TreeCache(self.model, len(prompts), gqa_attention=True)
        requests = []
        for row, prompt in enumerate(prompts):
            nodes = tc.add_chain(row, prompt, -1)
            root = Branch(id=0, parent=None, fork_index=None, level=0, active=True, k=self.opts.num_draft_tokens)
            index = row if indices is None else indices[row]
            budget = self.opts.max_new_tokens if budgets is None else budgets[row]
            requests.append(Request(index, row, list(prompt), nodes, [root], limit=budget, budget=budget))
        self.requests_by_index.update({r.index: r for r in requests})
        result = tc.forward(hidden=self.wants_hidden or self.gate is not None)
        for r in requests:
            if self.gate is not None:  # route the prompt before its first token is chosen
                router, threshold = self.gate
                r.p_list = router.p_list(result.hidden[r.row, result.column[r.row][r.prompt_nodes[-1]]])  # of [hidden]
                r.forks_gated = r.p_list < threshold
            r.counters.target_steps += 1
            r.counters.attended_keys += len(r.prompt) * (len(r.prompt) + 1) // 2
            root = r.branches[0]
            logits = result.of(r.row, [r.prompt_nodes[-1]])  # [1, V]
            view = BranchView(r.index, 0, None, None, [], r.prompt, 0)
            processed = self.apply_rules([view], [root], [[]], [[]], logits[None])[0]  # [1, V]
            token = self.choose(processed)
            if result.hidden is not None and self.wants_hidden:
                root.hidden = result.hidden[r.row, result.column[r.row][r.prompt_nodes[-1]]].clone()  # [hidden]
            if self.record_logits:
                root.logits.append(logits[0])
            self.commit_tokens(r, root, [token], fed_nodes=[])
            self.apply_budget(r)
            r.counters.live_kv.append(len(r.prompt))
        return requests, tc

    # ------------------------------------------------------------ phases
    def activate(self, live: list[Request]) -> None:
        """Move queued children to active while the live-branch bound allows."""
        cap = self.opts.max_live_branches
        for r in live:
            n_active = sum(b.active for b in r.branches)
            while r.queue and (cap is None or n_active < cap):
                r.branches[r.queue.popleft()].active = True
                n_active += 1

    def views(self, live: list[Request]) -> list[BranchView]:
        out = []
        for r in live:
            for b in r.branches:
                if b.active:
                    ctx = r.context(b) if self.spec is not None else []
                    shape = self.shape_of(b)
                    out.append(BranchView(r.index, b.id, b.parent, b.fork_index, b.tokens, ctx, shape.depth, shape, b.hidden))
        return out

    def shape_of(self, b: Branch) -> TreeShape:
        """The draft tree asked of branch ``b``: the option's shape, else a chain of its k."""
        return self.shape if self.shape is not None else chain(max(1, b.k))

    def propose(self, views: list[BranchView]) -> Proposal:
        """The speculator's drafts, normalised: explicit parent lists, nodes no deeper than
        asked (or than the speculator's own ``max_draft_depth``, when it has one) or than
        the branch's own cap allows (those tokens could not be kept)."""
        if self.spec is None:
            return Proposal([[] for _ in views], [None for _ in views], [[] for _ in views])
        raw = self.spec.propose(views, self.sampling)
        probs = list(raw.probs) if raw.probs else [None] * len(views)
        # a speculator may say it drafts deeper than the shape asks (a union's lookup chain)
        deeper = getattr(self.spec, "max_draft_depth", 0)
        out = Proposal([], [], [])
        for i, v in enumerate(views):
            b_generated = len(v.tokens) - (1 if v.parent is not None else 0)
            room = max(0, self.branch_cap - b_generated - 1)
            r = self.requests_by_index[v.request]
            if r.cutoff is not None:  # tokens after the budget's cut would be cut again
                room = min(room, max(0, r.cutoff[0] - clock.next_time(r.branches[v.branch])))
            tokens, parents = prune_tree(raw.tokens[i], raw.parents_of(i), min(max(v.k, deeper), room), self.spec.name)
            p = probs[i]
            if p is not None:
                if any(q != j - 1 for j, q in enumerate(parents)):
                    raise ValueError(f"speculator '{self.spec.name}' sent a sampled draft tree; sampled drafts must be chains")
                p = p[: len(tokens)]
            out.tokens.append(tokens)
            out.parents.append(parents)
            out.probs.append(p)
        return self.fit_step_budget(out)

    def fit_step_budget(self, proposal: Proposal) -> Proposal:
        """Cut drafts so one forward takes at most ``max_step_tokens`` tokens.

        Every branch keeps its pending token; the draft allowance left is shared evenly,
        the first branches (parents before children) taking the remainder. A draft list
        is cut to a prefix, which is still a tree (parents precede children) and, in
        ``draft_tree.layout``'s order (depth, then rank), keeps its shallowest, likeliest nodes.
        """
        cap = self.opts.max_step_tokens
        n = len(proposal.tokens)
        if cap is None or n == 0 or n + sum(map(len, proposal.tokens)) <= cap:
            return proposal
        share, extra = divmod(max(0, cap - n), n)
        out = Proposal([], [], [])
        for i, (tokens, parents, p) in enumerate(zip(proposal.tokens, proposal.parents, proposal.probs)):
            keep = share + (i < extra)
            out.tokens.append(tokens[:keep])
            out.parents.append(parents[:keep])
            out.probs.append(None if p is None else p[:keep])
        return out

    def verify(self, tc: TreeCache, live, views, proposal):
        """Schedule pending + drafts of every active branch; ONE forward for all of them."""
        by_index = {r.index: r for r in live}
        fed: list[list[int]] = []
        pending: dict[tuple[int, int], int] = {}  # (request, branch) -> node of its pending token this step
        for v, drafts, parents in zip(views, proposal.tokens, proposal.parents):  # parent branches come first
            r = by_index[v.request]
            b = r.branches[v.branch]
            nodes = [tc.add(r.row, b.tokens[-1], self.anchor(r, b, pending.get((v.request, b.parent))))]
            for tok, p in zip(drafts, parents):  # fed node 1 + i is draft i; -1 hangs under the pending node
                nodes.append(tc.add(r.row, tok, nodes[p + 1]))
            pending[(v.request, b.id)] = nodes[0]
            fed.append(nodes)
        result = tc.forward(hidden=self.wants_hidden)
        for r in live:
            r.counters.target_steps += 1
            r.counters.attended_keys += result.attended_keys[r.row]
        return fed, result

    def anchor(self, r: Request, b: Branch, parent_pending: Optional[int] = None) -> int:
        """The node the branch's pending token hangs under.

        A child whose [Fork] is its parent's pending token hangs under the node
        scheduled for it in this very forward (``parent_pending``).
        """
        if b.nodes:
            return b.nodes[-1]
        if b.parent is None:
            return r.prompt_nodes[-1]
        parent = r.branches[b.parent]
        return parent.nodes[b.fork_index] if b.fork_index < len(parent.nodes) else parent_pending

    def accept_and_commit(self, live, views, proposal, fed, result) -> list[list[int]]:
        """Accept per branch (batched over branches), then commit in branch order.

        Returns, per view, the accepted drafts' indices (root first). Greedy and
        deterministic drafts: the target's token at every fed node (argmax, or one draw
        from its distribution when sampling) and ``tree_accept_path``; sampled drafts
        (chains with probs): the Leviathan/Chen rejection rule.
        """
        n = len(views)
        if n == 0:
            return []
        by_index = {r.index: r for r in live}
        branches = [by_index[v.request].branches[v.branch] for v in views]
        n_max = max(len(nodes) for nodes in fed)  # pending + drafts
        device = result.logits.device
        # One gather: the logits of every fed node, [branches, n_max, V]; padding positions
        # repeat column 0 of the row (finite, never read).
        rows = torch.zeros(n, n_max, dtype=torch.long)
        cols = torch.zeros(n, n_max, dtype=torch.long)
        for i, (v, nodes) in enumerate(zip(views, fed)):
            row = by_index[v.request].row
            rows[i] = row
            cols[i, : len(nodes)] = torch.tensor([result.column[row][m] for m in nodes])
        rows, cols = rows.to(device), cols.to(device)
        raw = result.logits[rows, cols]  # [branches, n_max, V]
        target = self.apply_rules(views, branches, proposal.tokens, proposal.parents, raw)
        if not self.sampling.greedy and any(p is not None for p in proposal.probs):
            paths, bonus = self.rejection_paths(proposal, target)
        else:
            if self.sampling.greedy:
                choice = target.argmax(dim=-1)  # [branches, n_max]
            else:
                choice = sample(to_probs(target, self.sampling), generator=self.generator)  # [branches, n_max]
            choice = choice.tolist()
            paths = [tree_accept_path(p, d, c) for p, d, c in zip(proposal.parents, proposal.tokens, choice)]
            bonus = [c[1 + path[-1]] if path else c[0] for path, c in zip(paths, choice)]
        hidden = result.hidden
        for i, (v, d, nodes, b) in enumerate(zip(views, proposal.tokens, fed, branches)):
            r = by_index[v.request]
            path = paths[i]
            self.count_acceptance(r.counters, d, proposal.parents[i], path)
            kept = [0] + [1 + j for j in path]  # fed-node positions now committed with KV
            if self.record_logits:
                b.logits.extend(raw[i, kept])
            if hidden is not None:
                b.hidden = hidden[rows[i, kept[-1]], cols[i, kept[-1]]].clone()  # [hidden]
            self.commit_tokens(r, b, [d[j] for j in path] + [bonus[i]], fed_nodes=[nodes[m] for m in kept])
            if self.opts.adaptive_draft and self.spec is not None and self.shape is None:
                b.k = min(b.k + 2, self.opts.max_draft_tokens) if len(path) == len(d) else max(1, b.k - 1)
        return paths

    def rejection_paths(self, proposal: Proposal, target: torch.Tensor) -> tuple[list[list[int]], list[int]]:
        """Sampled drafts (chains): the Leviathan/Chen rule, batched over branches."""
        n = len(proposal.tokens)
        device = target.device
        k_max = max(len(d) for d in proposal.tokens)
        drafts = torch.full((n, k_max), -1, dtype=torch.long)  # [branches, k]
        for i, d in enumerate(proposal.tokens):
            drafts[i, : len(d)] = torch.tensor(d, dtype=torch.long)
        lens = torch.tensor([len(d) for d in proposal.tokens], dtype=torch.long, device=device)  # [branches]
        p = to_probs(target[:, : k_max + 1], self.sampling)  # [branches, k+1, V]
        acc = rejection_accept(drafts.to(device), lens, self.draft_probs(proposal, target.shape[-1], device), p, self.generator)
        return [list(range(a)) for a in acc.num_accepted.tolist()], acc.bonus.tolist()

    def draft_probs(self, proposal: Proposal, vocab: int, device) -> Optional[torch.Tensor]:
        """The draft distributions as ``[branches, k, V]`` (one-hot for deterministic drafts), or None if all are."""
        if all(p is None for p in proposal.probs):
            return None
        k_max = max(len(d) for d in proposal.tokens)
        q = torch.zeros(len(proposal.tokens), k_max, vocab, device=device)  # [branches, k, V]
        for i, (d, p) in enumerate(zip(proposal.tokens, proposal.probs)):
            if p is not None:
                q[i, : len(d)] = p.to(device=device, dtype=q.dtype)
            elif d:
                q[i, torch.arange(len(d)), torch.tensor(d, device=device)] = 1.0
        return q

    def rule_states(self, b: Branch, drafts: list[int], parents: list[int], prev: int) -> list[RuleState]:
        """Rule state at the pending node (token ``prev``) and at each draft node, along the
        node's own path (as if its ancestors were accepted): fed-node order, [1 + N]."""
        fork_id = self.apar.fork_id if self.apar else -1
        texts = self.fence_texts
        states = [RuleState(prev=prev, forks=b.forks, generated=b.generated, fence=self.fence_of(b))]
        for tok, p in zip(drafts, parents):
            s = states[p + 1]
            states.append(RuleState(prev=tok, forks=s.forks + (tok == fork_id), generated=s.generated + 1,
                                    fence=s.fence.after(texts.get(tok))))
        return states

    def fence_of(self, b: Branch) -> Fence:
        """Code-fence state after ``b``'s committed tokens, over its answer text (the
        ancestors' tokens up to the fork, then its own; not the prompt). A child starts
        outside any block: while the rule holds its parent forked outside one, and the
        ``[Fork]`` ends any run of backticks. So only the branch's own tokens are scanned,
        incrementally."""
        if not self.fence_texts:
            return Fence()
        if b.fence_at > len(b.tokens):  # tokens were cut (a capped child ends): scan afresh
            b.fence, b.fence_at = Fence(), 0
        for tok in b.tokens[b.fence_at :]:
            b.fence = b.fence.after(self.fence_texts.get(tok))
        b.fence_at = len(b.tokens)
        return b.fence

    def apply_rules(self, views, branches: list[Branch], drafts: list[list[int]], parents: list[list[int]], raw: torch.Tensor) -> torch.Tensor:
        """Branch-local logit rules on ``raw`` ``[branches, 1 + N, V]`` (pending node, then
        drafts), each node's along its own path: the user's processor, never ``[Child]``,
        ``[Fork]`` offset by ``fork_bias`` where it would spawn a child, and only where
        ``may_fork`` allows and the request is not gated by the fork router."""
        logits = raw.clone()
        if self.opts.logits_processor is not None:
            for i, (v, b, d, par) in enumerate(zip(views, branches, drafts, parents)):
                ctxs = [self.requests_by_index[v.request].context(b)]
                for tok, p in zip(d, par):
                    ctxs.append(ctxs[p + 1] + [tok])
                for j, ctx in enumerate(ctxs):
                    logits[i, j] = self.opts.logits_processor(ctx, logits[i, j])
        if self.apar is None:
            return logits
        logits[..., self.apar.child_id] = NEG_INF
        if self.opts.fork_bias and self.fork_enabled:  # where a [Fork] would spawn a child, not end one at the cap
            spawns = torch.tensor([b.level < self.opts.max_depth for b in branches], dtype=logits.dtype)  # [branches]
            logits[..., self.apar.fork_id] += (spawns * self.opts.fork_bias).to(logits.device)[:, None]
        ban = torch.zeros(logits.shape[:2], dtype=torch.bool)  # [branches, 1 + N]
        for i, (v, b, d, par) in enumerate(zip(views, branches, drafts, parents)):
            r = self.requests_by_index[v.request]
            if r.forks_gated:
                ban[i] = True
                continue
            prev = b.tokens[-1] if b.tokens else r.prompt[-1]
            for j, state in enumerate(self.rule_states(b, d, par, prev)):
                ban[i, j] = not self.may_fork(b, state)
        logits[..., self.apar.fork_id].masked_fill_(ban.to(logits.device), NEG_INF)
        return logits

    def may_fork(self, b: Branch, s: RuleState) -> bool:
        """Whether [Fork] stays in the branch's distribution (a fork by a child at the depth
        cap under ``depth_cap="end"`` ends that child instead of spawning one)."""
        return (
            self.fork_enabled
            and s.prev not in (self.apar.fork_id, self.apar.child_id)
            and (b.level < self.opts.max_depth or self.ends_at_cap(b))
            and s.forks < self.opts.max_forks_per_branch
            and not s.fence.inside  # always outside where fence_texts is empty (rule off)
            # the [Fork] must be followed by at least one more parent step, so its KV exists for the child
            and self.branch_cap - s.generated > 1
        )

    def ends_at_cap(self, b: Branch) -> bool:
        return b.is_child and b.level >= self.opts.max_depth and self.opts.depth_cap == "end"

    def settled_length(self, b: Branch) -> int:
        """How many of ``b``'s tokens no later step can take back (what a stream may send):
        all of them, except in a running child at the depth cap under ``depth_cap="end"``
        the line since its last line break, which a [Fork] would cut; and in a branch that
        may still fork, inside a run of forked titles (``repeated_title="end"``), the open
        segment, which a [Fork] after a repeated title would cut."""
        if b.finish is not None:
            return len(b.tokens)
        start = 1 if b.is_child else 0
        if self.ends_at_cap(b):
            j = last_line_start(b.tokens, self.apar.line_break_ids, start, len(b.tokens))
            return len(b.tokens) if j is None else j
        if self.title_texts and b.forks and b.level < self.opts.max_depth:  # no fork yet: no title to repeat
            titles, _ = title_run(self.title_texts, self.apar.fork_id, b.tokens[start:])
            if titles:
                return open_segment_start(b.tokens, self.apar.line_break_ids, self.apar.fork_id, start, len(b.tokens))
        return len(b.tokens)

    def repeats_title(self, b: Branch) -> bool:
        """Whether ``b``'s newest token, a spawning [Fork], follows a title that the branch
        already forked after in the same run (``DecodeOptions.repeated_title``)."""
        if not self.title_texts:
            return False
        titles, segment = title_run(self.title_texts, self.apar.fork_id, b.tokens[(1 if b.is_child else 0) : -1])
        key = title_key(segment)
        return key is not None and key in titles

    def choose(self, processed: torch.Tensor) -> int:
        """One token from rule-processed logits ``[1, V]`` (greedy or sampled)."""
        if self.sampling.greedy:
            return int(processed[0].argmax())
        probs = to_probs(processed, self.sampling)  # [1, V]
        return int(torch.multinomial(probs.float(), 1, generator=self.generator)[0])

    def commit_tokens(self, r: Request, b: Branch, new_tokens: list[int], fed_nodes: list[int]) -> None:
        """Append tokens to a branch; spawn children at [Fork]; end at EOS or a cap.
        The request's token budget is applied after the step (``apply_budget``)."""
        b.nodes.extend(fed_nodes)
        for tok in new_tokens:
            b.tokens.append(tok)
            b.sampled += 1
            is_fork = self.apar is not None and tok == self.apar.fork_id
            if is_fork and self.ends_at_cap(b):
                b.finish = "depth"
                b.cut = cut_to_last_line(b.tokens, self.apar.line_break_ids, start=1)
            elif is_fork and self.repeats_title(b):
                b.finish = "repeat"
                start = open_segment_start(b.tokens, self.apar.line_break_ids, self.apar.fork_id,
                                           1 if b.is_child else 0, len(b.tokens) - 1)
                b.cut = b.tokens[start:]
                del b.tokens[start:]
            elif is_fork:
                self.spawn_child(r, b)
            b.finish = b.finish or self.end_reason(r, b, tok)
            if b.finish is not None:
                b.active = False
                break
        # Accepted drafts after a cut (EOS/cap) are not the branch's: keep nodes consistent.
        del b.nodes[len(b.tokens) :]
        del b.logits[b.generated :]

    def end_reason(self, r: Request, b: Branch, tok: int) -> Optional[str]:
        """Why the branch ends at its newest token ``tok``, or None."""
        if tok in self.eos_ids:
            return "eos"
        if b.generated >= self.branch_cap:
            return "length"
        if self.max_pos is not None and len(r.prompt) + self.depth(r, b, len(b.tokens)) >= self.max_pos:
            return "context"
        return None

    def depth(self, r: Request, b: Branch, upto: int) -> int:
        """Nodes between the prompt and ``b.tokens[upto - 1]`` (itself included): its position - prompt length + 1."""
        if b.parent is None:
            return upto
        return self.depth(r, r.branches[b.parent], b.fork_index + 1) + upto

    def spawn_child(self, r: Request, parent: Branch) -> None:
        parent.forks += 1
        base, order = clock.child_clock(parent, len(parent.tokens) - 1)
        child = Branch(
            base=base,
            order=order,
            id=len(r.branches),
            parent=parent.id,
            fork_index=len(parent.tokens) - 1,
            level=parent.level + 1,
            tokens=[self.apar.child_id],
            k=self.opts.num_draft_tokens,
            is_child=True,
        )
        r.branches.append(child)
        r.queue.append(child.id)

    def apply_budget(self, r: Request) -> None:
        """Keep exactly the tokens plain APAR keeps under the request's budget (``clock``).

        Once ``limit`` tokens were sampled, the cut is the ``limit``-th key in APAR order.
        It can only move earlier as lagging branches sample more, so what lies after it
        goes now: a branch is cut back to its tokens before it (restoring what a finish
        rule cut after that point, since plain APAR never sampled the token that
        triggered the rule), a running branch whose next token falls after it ends with
        "budget", and a child whose [Fork] was cut is dropped from the answer. Branches
        that sample before the cut go on, so plain APAR's tokens are all sampled."""
        live = [b for b in r.branches if not b.dropped]
        r.budget = max(0, r.limit - sum(b.sampled for b in live))
        r.cutoff = clock.cutoff(live, r.limit)
        if r.cutoff is None:
            return
        for b in live:  # parents come before children
            if b.parent is not None:
                parent = r.branches[b.parent]
                if parent.dropped or b.fork_index >= len(parent.tokens):
                    b.dropped = True
                    self.stop_branch(r, b, b.finish)
                    continue
            keep = clock.kept(b, r.cutoff)
            if keep < b.sampled:
                full = b.tokens + b.cut
                del full[len(full) - (b.sampled - keep) :]
                b.tokens[:] = full
                b.cut, b.sampled = [], keep
                del b.nodes[len(b.tokens) :]
                del b.logits[b.generated :]
                self.stop_branch(r, b, "budget")
            elif b.finish is None and clock.past(b, r.cutoff):
                self.stop_branch(r, b, "budget")

    def stop_branch(self, r: Request, b: Branch, finish: Optional[str]) -> None:
        b.finish = finish
        b.active = False
        if b.id in r.queue:
            r.queue.remove(b.id)

    def running(self, r: Request) -> list[Branch]:
        return [b for b in r.branches if (b.active or b.id in r.queue) and not b.dropped]

    def settled(self, r: Request) -> dict[int, tuple[int, bool]]:
        """Per branch id (dropped ones left out): how many of its tokens no later step can
        take back, and whether its finish is final - what a stream may send.

        A token is final once its APAR time is below the horizon (``clock``) and no rule
        of ``settled_length`` holds it back; a child shows only once its parent's [Fork]
        is final. Plain APAR runs every branch on the clock, so only speculation (a branch
        ahead of others) or a deferred child holds tokens back."""
        h = clock.horizon(self.running(r))
        out: dict[int, tuple[int, bool]] = {}
        for b in r.branches:
            if b.dropped:
                continue
            if b.parent is not None and out.get(b.parent, (0, False))[0] <= b.fork_index:
                out[b.id] = (0, False)
                continue
            n = clock.final_sampled(b, h)
            offset = 1 if b.is_child else 0
            out[b.id] = (min(self.settled_length(b), offset + n, len(b.tokens)), b.finish is not None and n == b.sampled)
        return out

    def finish_request(self, r: Request, reason: str) -> None:
        for b in r.branches:
            if b.active or b.id in r.queue:
                b.active = False
                b.finish = b.finish or reason
        r.queue.clear()

    def count_acceptance(self, c: StepCounters, drafts: list[int], parents: list[int], path: list[int]) -> None:
        """Per branch-step: acceptance length, per-depth rates (a depth counts as drafted
        once per branch-step), and per-(depth, rank) verified/accepted node counts."""
        depth, rank = tree_depths_ranks(parents)
        n_depth = max(depth, default=0)
        accepted = len(path)
        c.branch_steps += 1
        c.drafted += len(drafts)
        c.accepted += accepted
        c.accept_plus_bonus += accepted + 1
        while len(c.drafted_at) < n_depth:
            c.drafted_at.append(0)
            c.accepted_at.append(0)
        for j in range(n_depth):
            c.drafted_at[j] += 1
            c.accepted_at[j] += j < accepted
        on_path = {-1, *path}
        for i, p in enumerate(parents):
            if p not in on_path:
                continue
            d, r = depth[i] - 1, rank[i]
            while len(c.depth_rank_verified) <= d:
                c.depth_rank_verified.append([])
                c.depth_rank_accepted.append([])
            for table in (c.depth_rank_verified[d], c.depth_rank_accepted[d]):
                table.extend([0] * (r + 1 - len(table)))
            c.depth_rank_verified[d][r] += 1
            c.depth_rank_accepted[d][r] += i in path

    # ------------------------------------------------------------ KV garbage
    def visible_prefixes(self, r: Request) -> list[int]:
        """Per branch, how many of its cached nodes some live (active or queued) branch can see."""
        need = [0] * len(r.branches)
        for b in r.branches:
            if b.active or b.id in r.queue:
                need[b.id] = max(need[b.id], len(b.nodes))
                child = b
                while child.parent is not None:
                    p = child.parent
                    need[p] = max(need[p], child.fork_index + 1)
                    child = r.branches[p]
        # a [Fork] that is still its parent's pending token has no node yet
        return [min(n, len(b.nodes)) for n, b in zip(need, r.branches)]

    def live_nodes(self, r: Request, need: list[int]) -> set[int]:
        """Target nodes some live branch can see: the exact live KV."""
        live = set(r.prompt_nodes) if not r.done else set()
        for b in r.branches:
            live.update(b.nodes[: need[b.id]])
        return live

    def collect_garbage(self, tc: TreeCache, live: list[Request]) -> None:
        """Count live KV exactly every step; gather the cache only when garbage passes the threshold."""
        needs = [self.visible_prefixes(r) for r in live]
        counts = [(len(r.prompt) if not r.done else 0) + sum(need) for r, need in zip(live, needs)]
        for r, n in zip(live, counts):
            r.counters.live_kv.append(n)
        garbage = tc.num_slots - max(counts, default=0)
        if garbage > 0 and garbage >= self.opts.compact_threshold * tc.num_slots:
            tc.compact([self.live_nodes(r, need) for r, need in zip(live, needs)])


def canonical_ids(branches: list[Branch]) -> dict[int, int]:
    """Branch id -> its number in plain APAR's order (``clock``), dropped branches left out.
    A branch's number is final once its [Fork] is (nothing can be created before it)."""
    kept = sorted((b for b in branches if not b.dropped), key=lambda b: b.order)
    return {b.id: i for i, b in enumerate(kept)}


def output_branches(branches: list[Branch]) -> list[Branch]:
    """A finished request's branches as plain APAR numbers them: dropped ones left out,
    ids and parents renumbered in APAR order, so results do not depend on the schedule."""
    ids = canonical_ids(branches)
    out = [replace(b, id=ids[b.id], parent=None if b.parent is None else ids[b.parent]) for b in branches if b.id in ids]
    return sorted(out, key=lambda b: b.id)


def last_line_start(tokens: list[int], line_breaks: frozenset[int], start: int, end: int) -> Optional[int]:
    """Index of the first token of the last run of line-break tokens in ``tokens[start:end]``
    (a blank line is often two tokens), or None if there is none."""
    j = next((i for i in range(end - 1, start - 1, -1) if tokens[i] in line_breaks), None)
    while j is not None and j > start and tokens[j - 1] in line_breaks:
        j -= 1
    return j


def cut_to_last_line(tokens: list[int], line_breaks: frozenset[int], start: int) -> list[int]:
    """Drop, in place, a branch's trailing [Fork] and the unfinished line before it, from
    its last line break on (tokens before ``start`` are kept). No line break: only the
    [Fork] goes. Returns what was dropped."""
    j = last_line_start(tokens, line_breaks, start, len(tokens) - 1)
    at = len(tokens) - 1 if j is None else j
    dropped = tokens[at:]
    del tokens[at:]
    return dropped


# ------------------------------------------------------------------- repeated titles
FORK_MARK = "\x00"  # stands for [Fork] in a branch's text (no token's text holds it)


def title_run(texts: tuple[str, ...], fork_id: int, tokens: list[int]) -> tuple[set[str], str]:
    """The keys of the titles a branch forked after in its current run, and its open segment.

    ``tokens`` are the branch's own (a child's without its ``[Child]``). In their text, a
    *forked segment* is the text before a [Fork], back to the previous line break or
    [Fork]; the *open segment* is the text after the last of either. The run is the forked
    segments from the open one back to the last non-blank line without a [Fork]."""
    text = "".join(FORK_MARK if t == fork_id else (texts[t] if t < len(texts) else "") for t in tokens)
    lines = text.split("\n")
    *forked, segment = lines[-1].split(FORK_MARK)
    for line in reversed(lines[:-1]):
        if FORK_MARK in line:
            forked.extend(line.split(FORK_MARK)[:-1])
        elif line.strip():
            break
    keys = {title_key(f) for f in forked}
    keys.discard(None)
    return keys, segment


def open_segment_start(tokens: list[int], line_breaks: frozenset[int], fork_id: int, start: int, end: int) -> int:
    """Where the open segment of ``tokens[start:end]`` begins, as a cut point: its last run
    of line-break tokens, or just after its last [Fork] if that comes later; ``start`` if
    neither exists."""
    j = last_line_start(tokens, line_breaks, start, end)
    f = next((i for i in range(end - 1, start - 1, -1) if tokens[i] == fork_id), None)
    cut = start if j is None else j
    return max(cut, f + 1) if f is not None else cut


# ------------------------------------------------------------------- draft trees
def tree_depths_ranks(parents: list[int]) -> tuple[list[int], list[int]]:
    """Per draft node: depth below the pending token (1 = first draft) and rank among its siblings."""
    depth: list[int] = []
    rank: list[int] = []
    seen: dict[int, int] = {}
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
        rank.append(seen.get(p, 0))
        seen[p] = rank[-1] + 1
    return depth, rank


def prune_tree(tokens: list[int], parents: list[int], max_depth: int, who: str) -> tuple[list[int], list[int]]:
    """Keep the drafts no deeper than ``max_depth``, drop a sibling repeating an earlier
    sibling's token (with its subtree), and renumber parents. Bad layouts are refused."""
    if len(parents) != len(tokens):
        raise ValueError(f"speculator '{who}' sent {len(tokens)} draft tokens but {len(parents)} parents")
    new_index: dict[int, int] = {-1: -1}
    depth: dict[int, int] = {-1: 0}
    sibling_tokens: dict[int, set[int]] = {}
    out_tokens: list[int] = []
    out_parents: list[int] = []
    for i, (tok, p) in enumerate(zip(tokens, parents)):
        if not -1 <= p < i:
            raise ValueError(f"speculator '{who}' sent draft {i} with parent {p}; parents must come first (-1 = pending)")
        if p not in new_index or depth[p] + 1 > max_depth:
            continue
        seen = sibling_tokens.setdefault(p, set())
        if tok in seen:
            continue
        seen.add(tok)
        depth[i] = depth[p] + 1
        new_index[i] = len(out_tokens)
        out_tokens.append(int(tok))
        out_parents.append(new_index[p])
    return out_tokens, out_parents
