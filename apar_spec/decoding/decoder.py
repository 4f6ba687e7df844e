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
from collections.abc import Callable
from typing import Optional

import torch

from apar_spec.decoding import budget as token_budget
from apar_spec.decoding import clock
from apar_spec.decoding.commit import Committer
from apar_spec.decoding.draft_tree import TreeShape, chain, parse_tree, prune_tree
from apar_spec.decoding.fork_rules import ForkRules
from apar_spec.decoding.paged_cache import new_cache
from apar_spec.decoding.sampling import SamplingConfig, rejection_accept, sample, to_probs, tree_accept_path
from apar_spec.decoding.speculator import BranchView, Outcome, Proposal, Speculator, StepPlanner
from apar_spec.decoding.state import Branch, DecodeResult, Request, output_branches
from apar_spec.decoding.tokens import AparTokens
from apar_spec.decoding.tree_cache import TreeCache
from apar_spec.models.router import gate_of
from apar_spec.options import DecodeOptions

NEG_INF = float("-inf")


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
        on_step: Optional[Callable[[list[Request], TreeCache], None]] = None,
        planner: Optional[StepPlanner] = None,
    ):
        """``record_logits`` keeps, per branch, the raw target logits that predicted each
        sampled token (for equality tests); ``on_step`` is called after every step.
        ``planner``: load-adaptive speculation (``costs/planning.py``): before each step it
        says how many draft nodes per branch pay at the current batch, 0 = none."""
        self.planner = planner if speculator is not None else None
        self.last_allowance: Optional[int] = None  # the planner's choice at the last step
        self.model = model
        self.record_logits = record_logits
        self.on_step = on_step
        self.opts = opts
        self.apar = apar
        self.fork_enabled = fork_enabled and apar is not None
        self.eos_ids = eos_ids
        self.spec = speculator
        self.sampling = SamplingConfig(opts.temperature, opts.top_p, opts.top_k)
        self.generator: Optional[torch.Generator] = None
        if not self.sampling.greedy:
            self.generator = torch.Generator(device=model.device)
            self.generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
        self.branch_cap = opts.max_branch_tokens or opts.max_new_tokens
        self.rules = ForkRules(opts, apar, fork_enabled, self.branch_cap)
        self.max_pos = getattr(model.config, "max_position_embeddings", None)
        self.committer = Committer(self.rules, eos_ids, self.max_pos, draft_k=opts.num_draft_tokens)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        if isinstance(opts.tree, str) and opts.tree.strip() == "auto":
            raise ValueError(
                "tree='auto' must be resolved by the cost model before decoding; give a shape such as 'topk:2x3'"
            )
        self.shape: Optional[TreeShape] = None if opts.tree is None else parse_tree(opts.tree)
        # the most one branch drafts in a step: the tree asked, else the longest chain
        self.widest_shape: TreeShape = self.shape or chain(
            opts.max_draft_tokens if opts.adaptive_draft else opts.num_draft_tokens
        )
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
            DecodeResult(
                r.prompt, output_branches(r.branches), r.counters, wall, draft_forwards, r.p_list, r.forks_gated
            )
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
        allowance = self.last_allowance = self.plan(live)
        # the planner's full allowance cuts nothing (a union's extra chains stay whole)
        cut = None if allowance is None or allowance >= self.widest_shape.size else allowance
        views = self.views(live, cut)
        if allowance == 0:  # drafting does not pay at this load: a plain step
            catch_up = getattr(self.spec, "catch_up", None)  # a draft LM keeps its cache level with the tree
            if catch_up is not None:
                catch_up(views)
            proposal = Proposal([[] for _ in views], [None for _ in views], [[] for _ in views])
        else:
            proposal = self.propose(views, cut)
        fed, result = self.verify(tc, live, views, proposal)
        paths = self.accept_and_commit(live, views, proposal, fed, result)
        if self.spec is not None:
            self.spec.observe(self.outcome(live, views, paths))
        if self.planner is not None and allowance:
            self.planner.observe(proposal.parents, paths)
        for r in live:
            token_budget.apply_budget(r)
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
        tc = new_cache(self.model, len(prompts), self.opts.kv_layout, gqa_attention=True)
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
                r.p_list = router.p_list(result.hidden[result.at(r.row, r.prompt_nodes[-1])])  # of [hidden]
                r.forks_gated = r.p_list < threshold
            r.counters.target_steps += 1
            r.counters.attended_keys += len(r.prompt) * (len(r.prompt) + 1) // 2
            root = r.branches[0]
            logits = result.of(r.row, [r.prompt_nodes[-1]])  # [1, V]
            view = BranchView(r.index, 0, None, None, [], r.prompt, 0)
            processed = self.rules.apply(self.requests_by_index, [view], [root], [[]], [[]], logits[None])[0]  # [1, V]
            token = self.choose(processed)
            if result.hidden is not None and self.wants_hidden:
                root.hidden = result.hidden[result.at(r.row, r.prompt_nodes[-1])].clone()  # [hidden]
            if self.record_logits:
                root.logits.append(logits[0])
            self.commit_tokens(r, root, [token], fed_nodes=[])
            token_budget.apply_budget(r)
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

    def plan(self, live: list[Request]) -> Optional[int]:
        """Draft nodes per branch for this step from the planner (None: no planner, the shape as asked)."""
        if self.planner is None:
            return None
        rows = sum(any(b.active for b in r.branches) for r in live)
        branches = sum(b.active for r in live for b in r.branches)
        return self.planner.allowance(rows, branches)

    def views(self, live: list[Request], allowance: Optional[int] = None) -> list[BranchView]:
        out = []
        cut: dict[TreeShape, TreeShape] = {}  # shape -> the planner's prefix of it, built once a step
        for r in live:
            for b in r.branches:
                if b.active:
                    ctx = r.context(b) if self.spec is not None else []
                    shape = self.shape_of(b)
                    if allowance:  # the planner's prefix of it (shallowest, likeliest nodes)
                        if shape not in cut:
                            cut[shape] = shape.prefix(allowance) or shape
                        shape = cut[shape]
                    out.append(
                        BranchView(r.index, b.id, b.parent, b.fork_index, b.tokens, ctx, shape.depth, shape, b.hidden)
                    )
        return out

    def shape_of(self, b: Branch) -> TreeShape:
        """The draft tree asked of branch ``b``: the option's shape, else a chain of its k."""
        return self.shape if self.shape is not None else chain(max(1, b.k))

    def propose(self, views: list[BranchView], allowance: Optional[int] = None) -> Proposal:
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
            if allowance is not None:  # a prefix in layout order is still a tree
                tokens, parents = tokens[:allowance], parents[:allowance]
            p = probs[i]
            if p is not None:
                if any(q != j - 1 for j, q in enumerate(parents)):
                    raise ValueError(
                        f"speculator '{self.spec.name}' sent a sampled draft tree; sampled drafts must be chains"
                    )
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
            rows[i] = result.entry(row)
            cols[i, : len(nodes)] = torch.tensor([result.column[row][m] for m in nodes])
        rows, cols = rows.to(device), cols.to(device)
        raw = result.logits[rows, cols]  # [branches, n_max, V]
        target = self.rules.apply(self.requests_by_index, views, branches, proposal.tokens, proposal.parents, raw)
        if not self.sampling.greedy and any(p is not None for p in proposal.probs):
            paths, bonus = self.rejection_paths(proposal, target)
        else:
            if self.sampling.greedy:
                choice = target.argmax(dim=-1)  # [branches, n_max]
            else:
                choice = sample(to_probs(target, self.sampling), generator=self.generator)  # [branches, n_max]
            chosen = choice.tolist()  # [branches][n_max]
            paths = [tree_accept_path(p, d, c) for p, d, c in zip(proposal.parents, proposal.tokens, chosen)]
            bonus = [c[1 + path[-1]] if path else c[0] for path, c in zip(paths, chosen)]
        hidden = result.hidden
        for i, (v, d, nodes, b) in enumerate(zip(views, proposal.tokens, fed, branches)):
            r = by_index[v.request]
            path = paths[i]
            r.counters.count_acceptance(d, proposal.parents[i], path)
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
        acc = rejection_accept(
            drafts.to(device), lens, self.draft_probs(proposal, target.shape[-1], device), p, self.generator
        )
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

    def choose(self, processed: torch.Tensor) -> int:
        """One token from rule-processed logits ``[1, V]`` (greedy or sampled)."""
        if self.sampling.greedy:
            return int(processed[0].argmax())
        probs = to_probs(processed, self.sampling)  # [1, V]
        return int(torch.multinomial(probs.float(), 1, generator=self.generator)[0])

    def commit_tokens(self, r: Request, b: Branch, new_tokens: list[int], fed_nodes: list[int]) -> None:
        """Append tokens to a branch; spawn children at [Fork]; end at EOS or a cap
        (``commit.Committer``). The request's token budget is applied after the step
        (``apply_budget``)."""
        b.nodes.extend(fed_nodes)
        self.committer.commit(r, b, new_tokens)
        # Accepted drafts after a cut (EOS/cap) are not the branch's: keep nodes consistent.
        del b.nodes[len(b.tokens) :]
        del b.logits[b.generated :]

    def settled(self, r: Request) -> dict[int, tuple[int, bool]]:
        """What a stream may send of each branch (``budget.settled``)."""
        return token_budget.settled(r, self.rules)

    def finish_request(self, r: Request, reason: str) -> None:
        for b in r.branches:
            if b.active or b.id in r.queue:
                b.active = False
                b.finish = b.finish or reason
        r.queue.clear()

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
        if tc.compaction_due(counts, self.opts.compact_threshold):
            tc.compact([self.live_nodes(r, need) for r, need in zip(live, needs)])
