"""Online drafter updates from the verifier's feedback, and the cost-aware bandit that decides when they pay.

Every update a drafter process receives tells it, for free, what the target committed after each of its
drafts, and the target's features there. `FeedbackBuffer` keeps the newest of that (a memory cap) in the
same shape as the offline training shards, so an online update is a few optimizer steps of the offline
loss (`drafter.train.block_loss`) on it. Updates cost compute on the machine that also drafts, so every
`decide_every` drafting rounds a bandit picks an arm, "skip" or "update n steps". An update trains a copy
of the drafter on a background thread, so drafting never waits for it. A guard measures it on the newest
generated rows, held out of it: per row, whether the drafter's first position agrees with the target's
top-1 before and after (a paired comparison, free of the noise of which prompts a window happened to
serve). The copy is swapped in between two rounds only when no more rows were lost than gained.

The reward of the arm pulled is the tokens/s the whole process served over the next window, with the
CPU time of the updates that landed in it added to its seconds (their cost, measured), plus the gain a
kept update goes on delivering after that
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
import threading
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


def training_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the drafter to train off the drafting path: its trainable parameters cloned, everything
    frozen (the embedding, the draft head, the rope tables) shared, the drafting copy left out."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad}
    memo[id(getattr(model, "_drafting", None))] = None
    return copy.deepcopy(model, memo)


class OnlineAdapter:
    """Owns a learned drafter's online learning in a drafter process: feed it every update (`observe`);
    every cfg.decide_every rounds it decides, and an update trains a copy of the model on a background
    thread (`training_copy`: the drafting path never waits for it) that is swapped in at a later `observe`,
    between drafting rounds, only if the guard kept it. While one trains, decisions wait (the reward
    window goes on). `observe` must not run inside a draft: the sidecar and the experiment call it
    between rounds."""

    def __init__(self, model, cfg: BanditConfig, clock=time.perf_counter, background: bool = True):
        self.model, self.cfg, self.clock, self.background = model, cfg, clock, background
        model.version = 0  # its weights now change: sessions keep what they need to recompute
        self.buffer = FeedbackBuffer(cfg.buffer_positions, cfg.shared)
        self.bandit = CostAwareBandit(cfg.arms, cfg.algorithm, cfg.exploration, cfg.discount, cfg.seed)
        self.opt_state: dict | None = None  # the optimizer's state after the last kept update
        self.train_cfg = TrainConfig()  # the offline loss weights
        self.to_draft = draft_index(model.draft_ids, model.embedding.shape[0])
        self.rng = random.Random(cfg.seed)
        self.rounds = self.window_tokens = self.window_rounds = self.decisions = self.updates = self.rollbacks = 0
        self.update_s = 0.0  # updates' wall time, all of them
        self.charged_s = 0.0  # CPU seconds of updates landed in the current window (charged to it)
        self.gain = 0.0  # the pulled arm's estimated relative throughput gain (0: skip)
        self.tau = 0.0  # tokens per round in the window before the newest decision
        self.arm: int | None = None
        self.window_start = clock()
        self.last: dict = {}
        self.running: threading.Thread | None = None
        self.done: dict | None = None  # a finished update's result, waiting to land

    def observe(self, session: str, update: VerifierUpdate, first: bool, tree: DraftTree | None = None) -> None:
        """tree: the session's previous tree (the one update.feedback judges)."""
        if self.done is not None:
            self.land()
        self.buffer.add(session, update, tree)
        self.rounds += 1
        if not first:
            self.window_tokens += len(update.new_tokens)
            self.window_rounds += 1
        if self.rounds % self.cfg.decide_every == 0 and self.running is None:
            self.decide()

    def decide(self) -> None:
        """Book the window's reward (tokens per second of its wall time plus the CPU time of the updates
        that landed in it, with a kept update's credited gain) to the arm pulled, and pull the next."""
        now = self.clock()
        tok_s = self.window_tokens / max(now - self.window_start + self.charged_s, 1e-9)
        tau = self.window_tokens / max(self.window_rounds, 1)
        if self.arm is not None:
            self.bandit.record(self.arm, tok_s * (1 + self.cfg.horizon * self.gain))
        self.arm = self.bandit.choose()
        self.decisions += 1
        self.window_start, self.window_tokens, self.window_rounds, self.charged_s = now, 0, 0, 0.0
        steps = self.cfg.arms[self.arm]
        self.last, self.gain, self.tau = {"arm": steps, "tok_s": round(tok_s, 3), "tau": round(tau, 3)}, 0.0, tau
        log.info("bandit decision %d: %s; arms %s", self.decisions, self.last, self.bandit.stats())
        if steps:
            self.start(steps)

    def start(self, steps: int) -> None:
        """An update of `steps` steps on the buffer as it is now: on a background thread (landing at a later
        `observe`), or, with background False (tests), trained and landed before returning."""
        train, guard = self.split()
        if not train or not guard:
            self.last.update(skipped="not enough feedback yet", gain=0.0)
            return
        work = lambda: setattr(self, "done", self.train(training_copy(self.model), steps, train, guard))
        if not self.background:
            work()
            self.land()
            return
        self.running = threading.Thread(target=work, name="online-update", daemon=True)
        self.running.start()

    def wait(self) -> None:
        """Let a running update finish and land (the end of an experiment)."""
        if self.running is not None:
            self.running.join()
        if self.done is not None:
            self.land()

    def land(self) -> None:
        """Swap a finished update's weights into the model if the guard kept it (on the caller's thread,
        between rounds); count it, charge its CPU time to the window, credit its gain."""
        result, self.done, self.running = self.done, None, None
        params, opt_state = result.pop("params"), result.pop("opt_state")
        if result["rolled_back"]:
            self.rollbacks += 1
        else:
            with torch.no_grad():
                for k, v in self.model.named_parameters():
                    if k in params:
                        v.copy_(params[k])
            self.opt_state = opt_state
            self.model.version += 1  # sessions recompute their context with the new weights
        self.updates += 1
        self.update_s += result["seconds"]
        self.charged_s += result["cpu_s"]
        # agreement gain at the first drafted position -> tau gain: drafted tokens are (tau - 1) of tau
        g, tau = result["guard_top1"], self.tau
        if not result["rolled_back"] and tau > 1:
            self.gain = result["gain_lcb"] / max(g[0], 1e-3) * (tau - 1) / tau
        self.last.update(result, gain=round(self.gain, 4))
        log.info("online update landed: %s", self.last)

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

    def train(self, model, steps: int, train: list[dict], guard: list[dict]) -> dict:
        """`steps` optimizer steps of the offline loss on `model` (a training copy), then the guard: kept
        only if no more guard rows were lost than gained. Returns the verdict with the trained parameters
        and optimizer state (unused when rolled back)."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        before = self.guard_hits(model, guard)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.cfg.lr, weight_decay=0.0)
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            conv = window(self.rng.choice(train), self.cfg.window_positions, self.rng)
            loss, _ = block_loss(model, conv, self.to_draft, self.train_cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        after = self.guard_hits(model, guard)
        return {
            "guard_top1": [round(float(before.float().mean()), 4), round(float(after.float().mean()), 4)],
            "guard_rows": len(before),
            "gain_lcb": round(paired_gain(before, after, self.cfg.guard_z), 4),
            "rolled_back": int(after.sum()) < int(before.sum()),
            "seconds": round(time.perf_counter() - t0, 3),
            "cpu_s": round(time.thread_time() - cpu0, 3),
            "params": {k: v.detach() for k, v in model.named_parameters() if v.requires_grad},
            "opt_state": opt.state_dict(),
        }

    def guard_hits(self, model, guard: list[dict]) -> torch.Tensor:
        """Per scored guard row: does the drafter's first block position agree with the target's top-1."""
        with torch.no_grad():
            return torch.cat([block_loss(model, g, self.to_draft, self.train_cfg)[1]["hits"] for g in guard])

    def stats(self) -> dict:
        return {
            "decisions": self.decisions,
            "updates": self.updates,
            "rollbacks": self.rollbacks,
            "update_s": self.update_s,
            "updating": self.running is not None,
            "buffer_positions": self.buffer.positions(),
            "buffer_acceptance": self.buffer.acceptance(),
            "last": self.last,
            "arms": self.bandit.stats(),
        }
