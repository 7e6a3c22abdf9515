"""Online drafter updates from the verifier's feedback, and the cost-aware bandit that decides when they pay.

Every update a drafter process receives tells it, for free, what the target committed after each of its
drafts, and the target's features there. `FeedbackBuffer` keeps the newest of that (a memory cap) in the
same shape as the offline training shards, so an online update is a few optimizer steps of the offline
loss (`drafter.train.block_loss`) on it. Updates cost compute on the machine that also drafts, so every
`decide_every` drafting rounds a bandit picks an arm, "skip" or "update n steps". A guard measures each
update on the newest generated rows, held out of it: per row, whether the drafter's first position agrees
with the target's top-1 before and after (a paired comparison, free of the noise of which prompts a
window happened to serve). It rolls the update back (weights and optimizer state, bit for bit) when more
rows were lost than gained.

The reward of the arm pulled is the tokens/s the whole process served over the next window, the update's
own wall time included (its cost, measured), plus the gain a kept update goes on delivering after that
window: the window's tokens/s x `horizon` windows x the update's relative throughput gain, estimated from
the guard: the paired agreement gain's lower confidence bound (`paired_gain`), relative to the agreement
before, scaled by the share of tau that drafted tokens make, (tau - 1) / tau.
Without that credit an update would pay for itself in one window or never: its gain lifts every later
window whatever arm is pulled there, so a one-window reward cannot tell the arms apart.

Losslessness is untouched: only the drafter changes. Sessions see a changed drafter at their next round
(the model's `version`): they recompute their context keys/values with the new weights."""

import copy
import logging
import math
import random
import time
import typing
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from drafter.train import TrainConfig, block_loss, draft_index, window
from proto import checks
from proto.interface import VerifierUpdate
from proto.tree import DraftTree

log = logging.getLogger(__name__)


@dataclass
class BanditConfig:
    enabled: bool = False  # only learned drafters can use it (refused for ngram / random)
    buffer_positions: int = 8192  # committed positions kept (token, feature, target's choice)
    shared: bool = True  # one buffer across sessions (outlives them); False: a cap per session,
    # dropped when the session ends
    arms: list[int] = field(default_factory=lambda: [0, 4, 16])  # optimizer steps per decision; 0 = skip
    decide_every: int = 64  # drafting rounds per decision (the reward window)
    algorithm: typing.Literal["ucb", "thompson"] = "ucb"
    exploration: float = 0.25  # UCB bonus scale / Thompson posterior width, in units of mean reward
    discount: float = 0.98  # per decision: old rewards fade, since the drafter keeps changing
    window_positions: int = 256  # positions per training window
    guard_positions: int = 256  # newest generated positions held out of an update to check it
    guard_z: float = 1.64  # credit the guard's agreement gain at its lower confidence bound
    lr: float = 3e-4
    horizon: float = 8.0  # windows an update's guard-measured gain is credited for (it persists
    # until the traffic moves on); 0 = the window's tokens/s only
    seed: int = 0

    def validate(self) -> None:
        if not self.arms or any(a < 0 for a in self.arms):
            raise ValueError(f"arms: a non-empty list of optimizer steps >= 0 (0 = skip), got {self.arms}")
        checks.positive(
            self, "buffer_positions", "decide_every", "window_positions", "guard_positions", "lr", "exploration"
        )
        checks.nonneg(self, "guard_z", "horizon")
        checks.fraction(self, "discount", low_open=True)


class FeedbackBuffer:
    """Per session: committed tokens, the target's features of them ([n, D], row i = after token i),
    the target's top-k next-token distribution at each row when the verifier sends it
    (verify.feedback_topk > 0), at each verified row the tokens drafted there (the judged tree's children
    of that node) and whether one was accepted, and which tokens were the user's (prompt) rather than
    generated. Never more than `cap` feature rows in all (shared) or per session; the oldest rows go first."""

    def __init__(self, cap: int, shared: bool):
        self.cap, self.shared = cap, shared
        self.sessions: OrderedDict[str, dict] = OrderedDict()  # oldest activity first

    def add(self, session: str, update: VerifierUpdate, tree: DraftTree | None = None) -> None:
        """tree: the session's previous tree, the one update.feedback judges (None if there was none)."""
        s = self.sessions.setdefault(
            session, {"tokens": [], "hidden": None, "topk": [], "drafted": [], "prompt": len(update.new_tokens)}
        )
        self.sessions.move_to_end(session)
        s["tokens"] += update.new_tokens
        if update.hidden is not None and len(update.hidden):
            h = update.hidden.to(torch.bfloat16)
            s["hidden"] = h if s["hidden"] is None else torch.cat([s["hidden"], h])
            # the update's rows are read after the previous newest token (the roots' parent, node -1) and
            # after each accepted node: the feedback's top-k at those nodes is the target's distribution there
            fb = update.feedback
            path = [-1] + list(fb.accepted) if fb is not None else []
            s["topk"] += [fb.target_topk.get(path[r]) if r < len(path) else None for r in range(len(h))]
            # row r's next token is the accepted child of path[r] while r < len(accepted), else the bonus
            # token, which none of the drafted children carried
            s["drafted"] += [
                (tuple(t for t, p in zip(tree.tokens, tree.parents) if p == path[r]), r < len(fb.accepted))
                if tree is not None and r < len(path)
                else None
                for r in range(len(h))
            ]
        self._evict(session)

    def end(self, session: str) -> None:
        if not self.shared:
            self.sessions.pop(session, None)

    def positions(self, session: str | None = None) -> int:
        rows = [s for k, s in self.sessions.items() if session is None or k == session]
        return sum(0 if s["hidden"] is None else len(s["hidden"]) for s in rows)

    def _evict(self, session: str) -> None:
        scope = [session] if not self.shared else list(self.sessions)
        while (over := self.positions(None if self.shared else session) - self.cap) > 0:
            key = next(k for k in scope if self.positions(k))
            s = self.sessions[key]
            drop = min(over, len(s["hidden"]))
            for k in ("hidden", "tokens", "topk", "drafted"):
                s[k] = s[k][drop:]
            s["prompt"] = max(0, s["prompt"] - drop)

    def acceptance(self) -> float | None:
        """Of the buffered rows where something was drafted, the share where the target took a drafted token."""
        rows = [d[1] for s in self.sessions.values() for d in s["drafted"] if d and d[0]]
        return sum(rows) / len(rows) if rows else None

    def conversations(self) -> list[dict]:
        """Every session's buffered rows as a training conversation (drafter.train.block_loss's input):
        the target's top-k where the verifier sent it, else its committed next token (its argmax at
        temperature 0) as a one-hot distribution."""
        out = []
        for s in self.sessions.values():
            n = 0 if s["hidden"] is None else len(s["hidden"])
            if n < 3:
                continue
            tokens = torch.tensor(s["tokens"][: n + 1])
            mask = torch.zeros(n, dtype=torch.uint8)
            mask[max(s["prompt"] - 1, 0) :] = 1  # rows whose next token was generated (data.py's convention)
            k = max((len(t[0]) for t in s["topk"] if t), default=1)
            ids, probs = torch.zeros(n, k, dtype=torch.int32), torch.zeros(n, k, dtype=torch.float16)  # [n, k]
            ids[:, 0], probs[:, 0] = tokens[1:], 1.0
            for r, t in enumerate(s["topk"]):
                if t:
                    ids[r], probs[r] = 0, 0.0
                    ids[r, : len(t[0])], probs[r, : len(t[1])] = torch.tensor(t[0]), torch.tensor(t[1])
            out.append(
                {"tokens": tokens[:n], "loss_mask": mask, "hidden": s["hidden"], "topk_ids": ids, "topk_probs": probs}
            )
        return out


class CostAwareBandit:
    """Discounted UCB1 or Gaussian Thompson sampling over arms; rewards are tokens/s. Statistics decay by
    `discount` at every record, so an arm whose value changed (the drafter improved, the traffic moved)
    is found out again. Deterministic for a seed."""

    def __init__(
        self, arms: list[int], algorithm: str = "ucb", exploration: float = 0.25, discount: float = 0.98, seed: int = 0
    ):
        self.arms, self.algorithm, self.exploration, self.discount = list(arms), algorithm, exploration, discount
        self.n = [0.0] * len(arms)  # discounted pull counts
        self.sum = [0.0] * len(arms)  # discounted reward sums
        self.sq = [0.0] * len(arms)  # discounted squared rewards (Thompson's spread)
        self.rng = random.Random(seed)

    def mean(self, i: int) -> float:
        return self.sum[i] / self.n[i] if self.n[i] else 0.0

    def choose(self) -> int:
        untried = [i for i, n in enumerate(self.n) if n == 0]
        if untried:
            return untried[0]
        scale = max(abs(self.mean(i)) for i in range(len(self.arms))) or 1.0
        if self.algorithm == "ucb":
            total = sum(self.n)
            score = [
                self.mean(i) + self.exploration * scale * math.sqrt(2 * math.log(max(total, 1.0)) / self.n[i])
                for i in range(len(self.arms))
            ]
        else:
            score = []
            for i in range(len(self.arms)):
                var = max(self.sq[i] / self.n[i] - self.mean(i) ** 2, 0.0) + (0.05 * scale) ** 2
                score.append(self.rng.gauss(self.mean(i), self.exploration * math.sqrt(var / self.n[i])))
        return max(range(len(self.arms)), key=lambda i: (score[i], -i))  # ties: the cheaper (earlier) arm

    def record(self, arm: int, reward: float) -> None:
        for i in range(len(self.arms)):
            self.n[i] *= self.discount
            self.sum[i] *= self.discount
            self.sq[i] *= self.discount
        self.n[arm] += 1.0
        self.sum[arm] += reward
        self.sq[arm] += reward * reward

    def stats(self) -> dict:
        return {
            f"arm{steps}": {"pulls": round(self.n[i], 3), "mean_tok_s": round(self.mean(i), 3)}
            for i, steps in enumerate(self.arms)
        }


def paired_gain(before: torch.Tensor, after: torch.Tensor, z: float) -> float:
    """Lower confidence bound of the agreement gain from `before` to `after`, bool [n] over the same rows:
    only rows that flipped tell (a sign test's normal approximation), so an update that moved a handful
    of rows either way earns nothing."""
    up, down = int((after & ~before).sum()), int((before & ~after).sum())
    return max(0.0, (up - down - z * math.sqrt(up + down)) / max(len(before), 1))


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return (
        {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad},
        copy.deepcopy(opt.state_dict()),
    )


def restore(model: torch.nn.Module, opt: torch.optim.Optimizer, snap: tuple[dict, dict]) -> None:
    params, opt_state = snap
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in params:
                v.copy_(params[k])
    opt.load_state_dict(opt_state)


class OnlineAdapter:
    """Owns a learned drafter's online learning in a drafter process: feed it every update (`observe`),
    it decides every cfg.decide_every rounds and updates the shared model in place (callers must not
    draft while `observe` runs: the sidecar calls it between drafting rounds on its event loop)."""

    def __init__(self, model, cfg: BanditConfig, clock=time.perf_counter):
        self.model, self.cfg, self.clock = model, cfg, clock
        model.version = 0  # its weights now change: sessions keep what they need to recompute
        self.buffer = FeedbackBuffer(cfg.buffer_positions, cfg.shared)
        self.bandit = CostAwareBandit(cfg.arms, cfg.algorithm, cfg.exploration, cfg.discount, cfg.seed)
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
        self.train_cfg = TrainConfig()  # the offline loss weights
        self.to_draft = draft_index(model.draft_ids, model.embedding.shape[0])
        self.rng = random.Random(cfg.seed)
        self.rounds = self.window_tokens = self.window_rounds = self.decisions = self.updates = self.rollbacks = 0
        self.update_s = 0.0
        self.gain = 0.0  # the pulled arm's estimated relative throughput gain (0: skip)
        self.arm: int | None = None
        self.window_start = clock()
        self.last: dict = {}

    def observe(self, session: str, update: VerifierUpdate, first: bool, tree: DraftTree | None = None) -> None:
        """tree: the session's previous tree (the one update.feedback judges)."""
        self.buffer.add(session, update, tree)
        self.rounds += 1
        if not first:
            self.window_tokens += len(update.new_tokens)
            self.window_rounds += 1
        if self.rounds % self.cfg.decide_every == 0:
            self.decide()

    def decide(self) -> None:
        now = self.clock()
        tok_s = self.window_tokens / max(now - self.window_start, 1e-9)
        tau = self.window_tokens / max(self.window_rounds, 1)
        if self.arm is not None:
            self.bandit.record(self.arm, tok_s * (1 + self.cfg.horizon * self.gain))
        self.arm = self.bandit.choose()
        self.decisions += 1
        self.window_start, self.window_tokens, self.window_rounds = now, 0, 0  # the update's time counts in its window
        steps = self.cfg.arms[self.arm]
        self.last, self.gain = {"arm": steps, "tok_s": round(tok_s, 3), "tau": round(tau, 3)}, 0.0
        if steps:
            self.last.update(self.update(steps))
            # agreement gain at the first drafted position -> tau gain: drafted tokens are (tau - 1) of tau
            g = self.last.get("guard_top1")
            if g and not self.last["rolled_back"] and tau > 1:
                self.gain = self.last["gain_lcb"] / max(g[0], 1e-3) * (tau - 1) / tau
            self.last["gain"] = round(self.gain, 4)
        log.info("bandit decision %d: %s; arms %s", self.decisions, self.last, self.bandit.stats())

    def split(self) -> tuple[list[dict], list[dict]]:
        """Training conversations and the guard set: the newest guard_positions generated rows (prompt rows
        are not scored), taken from the ends of the newest sessions backwards; the rest is for training."""
        train, guard, need = [], [], self.cfg.guard_positions
        for conv in reversed(self.buffer.conversations()):
            g = min(need, int(conv["loss_mask"].sum()))
            if g >= 3:
                guard.append({k: v[-g:] for k, v in conv.items()})
                need -= g
                conv = {k: v[:-g] for k, v in conv.items()}
            if int(conv["loss_mask"].sum()) >= 3:
                train.append(conv)
        return train, guard

    def update(self, steps: int) -> dict:
        train, guard = self.split()
        if not train or not guard:
            return {"skipped": "not enough feedback yet"}
        t0 = self.clock()
        before = self.guard_hits(guard)
        snap = snapshot(self.model, self.opt)
        self.model.train()
        for _ in range(steps):
            self.opt.zero_grad()
            conv = window(self.rng.choice(train), self.cfg.window_positions, self.rng)
            loss, _ = block_loss(self.model, conv, self.to_draft, self.train_cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        self.model.eval()
        after = self.guard_hits(guard)
        rolled_back = int(after.sum()) < int(before.sum())
        if rolled_back:
            restore(self.model, self.opt, snap)
            self.rollbacks += 1
        else:
            self.model.version += 1  # sessions recompute their context with the new weights
        self.updates += 1
        dt = self.clock() - t0
        self.update_s += dt
        return {
            "guard_top1": [round(float(before.float().mean()), 4), round(float(after.float().mean()), 4)],
            "guard_rows": len(before),
            "gain_lcb": round(paired_gain(before, after, self.cfg.guard_z), 4),
            "rolled_back": rolled_back,
            "seconds": round(dt, 3),
        }

    def guard_hits(self, guard: list[dict]) -> torch.Tensor:
        """Per scored guard row: does the drafter's first block position agree with the target's top-1."""
        with torch.no_grad():
            return torch.cat([block_loss(self.model, g, self.to_draft, self.train_cfg)[1]["hits"] for g in guard])

    def stats(self) -> dict:
        return {
            "decisions": self.decisions,
            "updates": self.updates,
            "rollbacks": self.rollbacks,
            "update_s": self.update_s,
            "buffer_positions": self.buffer.positions(),
            "buffer_acceptance": self.buffer.acceptance(),
            "last": self.last,
            "arms": self.bandit.stats(),
        }
