"""Suffix cache: where the context's suffix occurred before, in this session's own text (prompt and
committed tokens) and in the committed output of earlier and concurrent sessions, and what followed it.

Like SuffixDecoding (Oliaro et al., 2024; Arctic Inference), but on a hash index rather than a suffix
tree: every position is indexed by the `min_match` tokens before it; a lookup takes the most recent
occurrences of the context's last `min_match` tokens, extends each match backwards up to `max_match`,
and weighs each occurrence's continuation by 2^(its match length - the longest one). So the longest
matches decide, shorter ones offer alternatives, and every candidate node carries an estimate of its
probability given its parent (the weight of the occurrences through it over those through its parent).

The shared store holds the committed output of sessions (never their prompts), one document per
session, each under a scope key: "" for `global`, the client for `client` (the client_label up to its
first "/": proto.interface.client_of). A lookup only sees documents of its own key, so one client never
receives a continuation that only another client's text contains. It is bounded in tokens; the oldest
document goes first. It lives in memory: a restart starts it empty."""

import threading
import typing
from collections import OrderedDict
from dataclasses import dataclass

from drafter.hybrid import Scored
from proto import checks
from proto.interface import VerifierUpdate, client_of


@dataclass
class SuffixConfig:
    # what the cross-session store shares: nothing (session), among the sessions of one client (client:
    # the client_label up to its first "/"), or among all sessions (global)
    scope: typing.Literal["session", "client", "global"] = "client"
    max_tokens: int = 500_000  # committed tokens the shared store keeps (all clients); oldest session evicted first
    min_match: int = 2  # shortest context suffix that counts as a match
    max_match: int = 32  # longest suffix compared (longer matches count as this long)
    max_depth: int = 16  # tokens taken after each occurrence
    max_occurrences: int = 32  # most recent occurrences compared per lookup, per index

    def validate(self) -> None:
        checks.positive(self, "max_tokens", "min_match", "max_depth", "max_occurrences")
        if self.max_match < self.min_match:
            raise ValueError(f"max_match: {self.max_match} < min_match {self.min_match}")


class Occurrence(typing.NamedTuple):
    match: int  # tokens of the context's suffix that precede it there
    continuation: list[int]  # what followed, at most max_depth tokens


class SuffixIndex:
    """Documents (token lists) under scope keys, indexed by every min_match-gram; bounded in tokens
    (oldest document evicted first) when max_tokens > 0. Thread-safe: the sidecar's sessions share one."""

    def __init__(self, cfg: SuffixConfig, max_tokens: int = 0):
        self.cfg, self.max_tokens = cfg, max_tokens
        self.docs: OrderedDict[int, tuple[str, list[int]]] = OrderedDict()  # id -> (scope key, tokens), oldest first
        self.index: dict[tuple, list[tuple[int, int]]] = {}  # (key, *gram) -> [(doc, end)], oldest first
        self.tokens = 0
        self.next_id = 0
        self.lock = threading.Lock()

    def open(self, key: str) -> int:
        with self.lock:
            doc = self.next_id
            self.next_id += 1
            self.docs[doc] = (key, [])
            return doc

    def extend(self, doc: int, new_tokens: list[int]) -> None:
        m, cap = self.cfg.min_match, 4 * self.cfg.max_occurrences
        with self.lock:
            if doc not in self.docs:  # evicted while its session ran: it starts again
                return
            key, toks = self.docs[doc]
            for tok in new_tokens:
                toks.append(tok)
                if len(toks) >= m:
                    entries = self.index.setdefault((key, *toks[-m:]), [])
                    entries.append((doc, len(toks)))
                    if len(entries) > cap:  # only the newest occurrences are ever compared
                        del entries[: len(entries) - cap]
            self.tokens += len(new_tokens)
            while self.max_tokens and self.tokens > self.max_tokens and len(self.docs) > 1:
                self._evict()

    def _evict(self) -> None:
        doc, (key, toks) = self.docs.popitem(last=False)
        self.tokens -= len(toks)
        m = self.cfg.min_match
        for gram in {tuple(toks[j - m : j]) for j in range(m, len(toks) + 1)}:
            entries = self.index.get((key, *gram))
            if entries is not None:
                entries[:] = [e for e in entries if e[0] != doc]
                if not entries:
                    del self.index[(key, *gram)]

    def occurrences(self, key: str, context: list[int], skip_doc: int = -1) -> list[Occurrence]:
        """Earlier occurrences of context's suffix in documents under key (never doc skip_doc), newest
        first, each with its match length and continuation; an occurrence at the very end of its
        document (nothing followed yet) is left out."""
        cfg = self.cfg
        if len(context) < cfg.min_match:
            return []
        out = []
        with self.lock:
            entries = self.index.get((key, *context[-cfg.min_match :]), ())
            for doc, end in reversed(entries[-cfg.max_occurrences - 1 :]):
                if doc == skip_doc or doc not in self.docs:
                    continue
                toks = self.docs[doc][1]
                if end >= len(toks):
                    continue
                n = cfg.min_match
                while n < cfg.max_match and n < end and n < len(context) and toks[end - n - 1] == context[-n - 1]:
                    n += 1
                out.append(Occurrence(n, toks[end : end + cfg.max_depth]))
                if len(out) == cfg.max_occurrences:
                    break
        return out


def suffix_candidates(occurrences: list[Occurrence]) -> Scored | None:
    """The occurrences' continuations as one trie, best-weighted children first; each node's probability
    given its parent is the weight of the continuations through it over those through its parent
    (weight 2^(match - longest match)). Scored.feature is the longest match length."""
    if not occurrences:
        return None
    longest = max(o.match for o in occurrences)
    weight: dict[tuple[int, ...], float] = {}
    for o in occurrences:
        w = 2.0 ** (o.match - longest)
        for d in range(1, len(o.continuation) + 1):
            path = tuple(o.continuation[:d])
            weight[path] = weight.get(path, 0.0) + w
    total = sum(w for p, w in weight.items() if len(p) == 1)
    # depth-first, heavier siblings first (a parent's key is a prefix of its children's: it sorts first)
    paths = sorted(weight, key=lambda p: [-weight[p[: d + 1]] for d in range(len(p))])
    ids = {p: i for i, p in enumerate(paths)}
    return Scored(
        [p[-1] for p in paths],
        [ids[p[:-1]] if len(p) > 1 else -1 for p in paths],
        [weight[p] / (weight[p[:-1]] if len(p) > 1 else total) for p in paths],
        longest,
    )


class SuffixSession:
    """One session's view: its own text (prompt + committed tokens) and, unless scope is session, the
    shared store's documents under its scope key, where its own committed output goes too."""

    def __init__(self, cfg: SuffixConfig, store: SuffixIndex | None, client: str = ""):
        self.cfg = cfg
        self.own = SuffixIndex(cfg)
        self.own_doc = self.own.open("")
        self.store = store if cfg.scope != "session" else None
        self.key = client_of(client) if cfg.scope == "client" else ""
        self.shared_doc = self.store.open(self.key) if self.store is not None else -1
        self.context: list[int] = []
        self.started = False  # the first update is the prompt: it never enters the shared store

    def scored(self, update: VerifierUpdate) -> Scored | None:
        """Absorb the committed tokens, then the candidates after the context's suffix."""
        self.context += update.new_tokens
        self.own.extend(self.own_doc, update.new_tokens)
        if self.store is not None and self.started:
            self.store.extend(self.shared_doc, update.new_tokens)
        self.started = True
        if update.max_nodes <= 0:
            return None
        found = self.own.occurrences("", self.context)
        if self.store is not None:
            found += self.store.occurrences(self.key, self.context, skip_doc=self.shared_doc)
        return suffix_candidates(found)

    def close(self) -> None:  # its committed output stays in the shared store for later sessions
        self.own = SuffixIndex(self.cfg)
        self.context = []
