"""Verification rules: pure functions of (target logits per tree node, draft tree, sampling params,
rng) -> Verdict. No model inside; the decode loop feeds them.

Logits come per *row*, on demand: row 0 is the target's next-token distribution after the last
committed token (the parent of the draft roots), row i+1 the distribution after draft node i. A rule
asks only for the rows it visits, so the target's LM head runs ~tau times per step, not N+1 times."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels import sample_per_node
from proto.interface import SamplingParams
from proto.tree import DraftTree

__all__ = [
    "MULTI_DRAFT_RULES",
    "SAMPLED_TREE_RULES",
    "SamplingParams",
    "Verdict",
    "follow",
    "multi_draft_plan",
    "next_token",
    "spectr_rho",
    "target_probs",
    "traverse",
    "verify",
    "walk",
]


@dataclass
class Verdict:
    accepted: list[int]  # accepted node ids, root to deepest
    bonus: int  # the token the target adds after the accepted path
    target_probs: dict[int, float]  # node -> target probability of its token, for nodes whose parent was visited
    visited: dict[int, torch.Tensor] = field(default_factory=dict)  # visited row -> target distribution [V]


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, exactly as plain sampling applies them.
    logits: [M, V] float32 -> probs [M, V]."""
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (the first always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= params.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    """The target's own choice from logits [V]: argmax at temperature 0, else a sample of the filtered
    distribution. Returns (token, that distribution [V], or None at temperature 0). Plain decoding
    and every visited tree node go through this one function."""
    if params.temperature == 0:
        return int(logits.argmax()), None
    probs = target_probs(logits[None], params)
    return int(sample_per_node(probs, generator)[0]), probs[0]


def walk(tree: DraftTree, decide: Callable[[int, list[int]], tuple[int | None, int | None]]) -> tuple[list[int], int]:
    """Walk the tree from the root. decide(row, children) is the rule at one visited row (row 0 after
    the last committed token, row i+1 after node i), called once per row in order: it returns the child
    to descend into, or (None, token) to emit token and stop. Returns (accepted node ids, bonus token)."""
    children: dict[int, list[int]] = {}
    for i, par in enumerate(tree.parents):
        children.setdefault(par, []).append(i)
    accepted, node = [], -1
    while True:
        nxt, token = decide(node + 1, children.get(node, []))
        if nxt is None:
            return accepted, token
        accepted.append(nxt)
        node = nxt


def follow(tree: DraftTree, choose: Callable[[int], int]):
    """The per-node rule: the target chooses a token at the row (choose(row): argmax, or one fresh sample
    of p); descend into the first child carrying it, else emit it."""

    def decide(row: int, kids: list[int]) -> tuple[int | None, int | None]:
        want = choose(row)
        nxt = next((c for c in kids if tree.tokens[c] == want), None)
        return (nxt, None) if nxt is not None else (None, want)

    return decide


MULTI_DRAFT_RULES = ("specinfer", "spectr")  # token-level: one plan per visited node
SAMPLED_TREE_RULES = MULTI_DRAFT_RULES + ("traversal",)  # every rule that needs a sampled tree


def spectr_rho(p: torch.Tensor, q: torch.Tensor, k: int, grid: int = 2049) -> float:
    """K-SEQ's ρ: the smallest ρ in [1, k] with γ(ρ) <= ρ·β(ρ), where β(ρ) = Σ min(q, p/ρ) and
    γ(ρ) = 1 - (1 - β)^k. ρ·β - γ grows with ρ and holds at ρ = k (Bernoulli's inequality).

    β(ρ) = q-mass of {p/q >= ρ} + p-mass of {p/q < ρ} / ρ, so β on a whole grid of ρ is one pass over
    the vocabulary: bucket every token's ratio among the uniform grid's points (arithmetic), add up p
    and q per bucket (bincount), prefix sums. Two grid rounds bracket ρ* to ~(k-1)/grid², and the
    bracket's upper end is returned (valid by construction). p, q: [V] float64."""
    if k == 1:
        return 1.0  # single draft: γ = β, valid at ρ = 1
    drawn = q > 0
    pd, qd = p[drawn], q[drawn]
    ratio = pd / qd

    def valid(rhos: torch.Tensor) -> torch.Tensor:  # [G] uniform grid -> [G] bool
        g, lo, step = rhos.shape[0], rhos[0], rhos[1] - rhos[0]
        # grid points <= each token's ratio (a token on a grid point counts on either side: equal min)
        bucket = ((ratio - lo) / step).floor().clamp(-1, g - 1).long() + 1
        q_at = torch.bincount(bucket, weights=qd, minlength=g + 1)
        p_at = torch.bincount(bucket, weights=pd, minlength=g + 1)
        q_ge = q_at.flip(0).cumsum(0).flip(0)[1:]  # [G] q-mass with ratio >= ρ_j
        p_lt = p_at.cumsum(0)[:-1]  # [G] p-mass with ratio < ρ_j
        beta = q_ge + p_lt / rhos
        return 1 - (1 - beta) ** k <= rhos * beta + 1e-14  # slack for rounding (q = p: equality at ρ = 1)

    lo, hi = 1.0, float(k)
    for _ in range(2):
        rhos = torch.linspace(lo, hi, grid, dtype=torch.float64)
        ok = valid(rhos).nonzero()
        if len(ok) == 0:  # only rounding can make ρ = k fail
            return hi
        first = int(ok[0])
        if first == 0:
            return float(rhos[0])
        lo, hi = float(rhos[first - 1]), float(rhos[first])
    return hi


def multi_draft_plan(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], rule: str
) -> tuple[list[float], torch.Tensor]:
    """One node of a sampled tree: its children `drafts` are k i.i.d. draws from q; p is the target's
    distribution there. Returns the rule as a plan: candidate i (tried in order) is accepted with
    probability accept[i] if all before it were rejected; if all are, the token comes from `residual`.
    p, q: [V]; residual [V] float64.

    specinfer: multi-round rejection sampling (draws with replacement): accept x_i with
               min(1, p_i(x_i)/q(x_i)), then p_{i+1} = norm(max(p_i - q, 0)).
    spectr:    K-SEQ: accept x_i with min(1, p(x_i)/(ρ q(x_i))); residual ∝ p - γ·min(q, p/ρ)/β."""
    p, q = p.double(), q.double()
    if rule == "specinfer":
        accept, cur = [], p
        for x in drafts:
            accept.append(min(1.0, float(cur[x] / q[x])))
            res = (cur - q).clamp(min=0)
            if res.sum() > 0:  # 0 means cur == q: every candidate is accepted, no residual is needed
                cur = res / res.sum()
        return accept, cur
    rho = spectr_rho(p, q, len(drafts))
    m = torch.minimum(q, p / rho)
    beta = m.sum()
    gamma = 1 - (1 - beta) ** len(drafts)
    res = (p - gamma * m / beta).clamp(min=0) if beta > 0 else p
    return [min(1.0, float(p[x] / (rho * q[x]))) for x in drafts], (res / res.sum() if res.sum() > 0 else p)


def traverse(
    tree: DraftTree, p_row: Callable[[int], torch.Tensor], coin: Callable[[float], bool]
) -> tuple[list[int], torch.Tensor]:
    """Traversal Verification (Weng et al., 2025) on a sampled tree: sequence-level acceptance, decided
    leaf to root. p_row(row) -> the target distribution [V] float64 at a row (asked lazily, only for rows
    the traversal reaches); coin(a) -> True with probability a. Returns (accepted node ids, the
    distribution [V] the bonus token is drawn from).

    Each node carries an acceptance mass m [V] over the token that follows it: m = a·p, where a is the
    probability that the path up to the node is kept (a = 1 at the root). A child carrying token y is
    kept with a_child = min(1, m(y) / q(y)), which compounds target/draft ratios along the path instead
    of capping each one (the sequence-level part). The traversal is post-order: a node's children are
    tried in order, each child's whole subtree first; when a child's subtree is rejected, the parent's
    mass becomes max(m - q, 0) / R, where R = 1 - Σ min(q, m) is the probability that a child drawn from q
    is rejected. Once all children are rejected, the node itself is kept with probability Σ m and the
    next token is drawn from m / Σ m; a leaf is kept with its a and the bonus comes from its p.

    Why it is exact (the tests check it by enumeration): by induction, a node entered with a emits
    "this node kept, then token y" with probability a·p(y) and nothing else kept below it with
    probability 1 - a. A child drawn from q delivers min(q(y), m(y)) of that; the update leaves exactly
    the missing mass max(m - q, 0) to the remaining siblings and the node's own residual, and does not
    depend on the rejected child's token, so the next i.i.d. sibling sees the same situation again."""
    children: dict[int, list[int]] = {}
    for i, par in enumerate(tree.parents):
        children.setdefault(par, []).append(i)
    q_rows = tree.draft_probs

    def visit(node: int, a: float) -> tuple[list[int], torch.Tensor] | None:
        kids = children.get(node, [])
        if not kids:
            return ([], p_row(node + 1)) if coin(a) else None
        m = a * p_row(node + 1)
        q = q_rows[node + 1].double()
        for c in kids:
            y = tree.tokens[c]
            kept = visit(c, min(1.0, float(m[y] / q[y])))
            if kept is not None:
                return [c] + kept[0], kept[1]
            rejected = 1.0 - float(torch.minimum(q, m).sum())
            m = (m - q).clamp(min=0) / max(rejected, 1e-300)  # rejected > 0 whenever this line is reachable
        # the root is the committed context: kept for certain (its Σ m is 1 up to rounding), no coin
        return ([], m / m.sum()) if node < 0 or coin(min(1.0, float(m.sum()))) else None

    return visit(-1, 1.0)


def verify(
    row_logits: Callable[[int], torch.Tensor],
    tree: DraftTree | None,
    params: SamplingParams,
    generator: torch.Generator | None,
    rule: str = "walk",
) -> Verdict:
    """Verify a tree against the target. row_logits(row) -> logits [V], asked only for visited rows.

    Temperature 0: follow the target's argmax through the tree (any tree, any rule).
    rule "walk" (deterministic or sampled trees): at each visited node the target draws a fresh sample
    of p and the walk descends while a child carries it; independent draws per node make the emitted
    tokens exactly plain sampling's.
    rule "specinfer" / "spectr" (sampled trees only, see DraftTree.draft_probs): at each visited node the
    multi-draft rule picks among its i.i.d. children or emits a residual sample; a leaf emits a sample of p.
    rule "traversal" (sampled trees only): see traverse."""
    if tree is None:
        return Verdict([], next_token(row_logits(0), params, generator)[0], {})
    probs: dict[int, torch.Tensor] = {}  # visited row -> the target distribution there [V]

    def choose(row: int) -> int:
        logits = row_logits(row)
        token, dist = next_token(logits, params, generator)
        probs[row] = logits.softmax(dim=-1) if dist is None else dist  # greedy: plain softmax, for feedback
        return token

    if params.temperature == 0 or rule == "walk":
        accepted, bonus = walk(tree, follow(tree, choose))
    elif tree.draft_probs is None:
        raise ValueError(
            f"verify rule {rule!r} needs a sampled tree (i.i.d. sibling groups with draft_probs); "
            "this tree is deterministic: use rule 'walk'"
        )
    elif rule == "traversal":

        def p_row(row: int) -> torch.Tensor:
            probs[row] = target_probs(row_logits(row)[None], params)[0]
            return probs[row].double()

        def coin(a: float) -> bool:
            return float(torch.rand(1, generator=generator, dtype=torch.float64)) < a

        accepted, dist = traverse(tree, p_row, coin)
        bonus = int(sample_per_node(dist[None], generator)[0])
    else:

        def decide(row: int, kids: list[int]) -> tuple[int | None, int | None]:
            if not kids:
                return None, choose(row)
            probs[row] = p = target_probs(row_logits(row)[None], params)[0]
            accept, residual = multi_draft_plan(p, tree.draft_probs[row], [tree.tokens[c] for c in kids], rule)
            coins = torch.rand(len(kids), generator=generator, dtype=torch.float64).tolist()
            chosen = next((c for c, a, u in zip(kids, accept, coins) if u < a), None)
            if chosen is not None:
                return chosen, None
            return None, int(sample_per_node(residual[None], generator)[0])

        accepted, bonus = walk(tree, decide)
    target = {
        i: float(probs[par + 1][tok]) for i, (tok, par) in enumerate(zip(tree.tokens, tree.parents)) if par + 1 in probs
    }
    return Verdict(accepted, bonus, target, probs)
