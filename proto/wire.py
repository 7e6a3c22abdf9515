"""Between the in-process contract (proto/interface.py, proto/tree.py) and specdraft.v1 messages.
Encoding is trusted; decoding an update checks every field against the session and raises WireError
naming the first bad one (the server turns it into INVALID_ARGUMENT)."""

import math

import torch

from proto import drafter_pb2 as pb
from proto.interface import MIN_TEMPERATURE, Feedback, SamplingParams, VerifierUpdate

API_VERSION = "specdraft.v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


MAX_DIMS = 8  # a tensor's dimensions at most (hidden states have 2)
QUOTE = 100  # characters of client input an error message quotes at most


class WireError(ValueError):
    """A message field that breaks the contract; the text names the field and the bad value."""


def quote(value) -> str:
    """repr(value) cut to QUOTE characters: an error or a log line never echoes a client's whole input,
    and the escapes keep a newline in it from forging a log line."""
    text = repr(value)
    return text if len(text) <= QUOTE else f"{text[:QUOTE]}... ({len(text)} characters)"


def tensor_to_msg(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    return pb.Tensor(
        dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), data=t.view(-1).view(torch.uint8).numpy().tobytes()
    )


def msg_to_tensor(msg: pb.Tensor, field: str) -> torch.Tensor:
    if msg.dtype not in DTYPES:
        raise WireError(f"{field}.dtype: {quote(msg.dtype)} is not one of {', '.join(DTYPES)}")
    if len(msg.shape) > MAX_DIMS:
        raise WireError(f"{field}.shape: {len(msg.shape)} dimensions, at most {MAX_DIMS}")
    shape = list(msg.shape)
    if any(not 0 <= d < 2**31 for d in shape):  # also keeps torch's size arithmetic from overflowing
        raise WireError(f"{field}.shape: {shape}: every size must be in [0, 2**31)")
    dtype = DTYPES[msg.dtype]
    want = math.prod(shape) * dtype.itemsize
    if len(msg.data) != want:
        raise WireError(f"{field}.data: {len(msg.data)} bytes, but {msg.dtype} {shape} needs {want}")
    if want == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).view(shape)


def update_to_msg(update: VerifierUpdate, round_: int, first: bool, label: str = "") -> pb.VerifierUpdate:
    msg = pb.VerifierUpdate(round=round_, new_tokens=update.new_tokens, max_nodes=update.max_nodes)
    if first:
        msg.vocab_size, msg.client_label = update.vocab_size, label
    if update.hidden is not None:
        msg.hidden.CopyFrom(tensor_to_msg(update.hidden))
    if update.sampling is not None:
        s = update.sampling
        msg.sampling.CopyFrom(pb.SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p))
    if update.feedback is not None:
        fb = update.feedback
        msg.feedback.accepted.extend(fb.accepted)
        msg.feedback.prob_nodes.extend(fb.target_probs.keys())
        msg.feedback.probs.extend(fb.target_probs.values())
        for node, (tokens, probs) in fb.target_topk.items():
            msg.feedback.target_topk.add(node=node, tokens=tokens, probs=probs)
        msg.feedback.verify_ms = fb.verify_ms
    return msg


def _tokens(values, vocab: int, field: str) -> list[int]:
    tokens = list(values)
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab):  # min and max run in C; the loop only finds which
        i, t = next((i, t) for i, t in enumerate(tokens) if not 0 <= t < vocab)
        raise WireError(f"{field}[{i}]: token {t} outside the vocabulary [0, {vocab})")
    return tokens


def _probs(values, field: str) -> list[float]:
    probs = list(values)
    if not all(0.0 <= p <= 1.0 for p in probs):  # NaN fails too
        i, p = next((i, p) for i, p in enumerate(probs) if not 0.0 <= p <= 1.0)
        raise WireError(f"{field}[{i}]: {p} is not a probability")
    return probs


def msg_to_update(
    msg: pb.VerifierUpdate,
    vocab: int,
    hidden_dim: int,
    prev_parents: tuple[int, ...] | None,
    max_nodes: int,
    first: bool,
    max_topk: int = 64,
) -> VerifierUpdate:
    """Check an update against the session: vocab is the server's vocabulary, hidden_dim the width the
    drafter expects (0 = it takes none: any hidden is ignored), prev_parents the parents of the tree last
    sent (None if none), max_nodes the server's cap on the budget, max_topk its cap on the tokens of one
    feedback.target_topk row. The checks run in field order, so the first bad field is the one named."""
    if first and msg.vocab_size != vocab:
        raise WireError(
            f"vocab_size: {msg.vocab_size} on the first update, but this drafter serves a vocabulary of {vocab}"
        )
    if not first and msg.vocab_size not in (0, vocab):
        raise WireError(f"vocab_size: {msg.vocab_size} differs from the session's {vocab}")
    if not msg.new_tokens:
        raise WireError(
            "new_tokens: empty (the first update carries the prompt, and every round commits at least one token)"
        )
    tokens = _tokens(msg.new_tokens, vocab, "new_tokens")
    if msg.max_nodes < 0:
        raise WireError(f"max_nodes: {msg.max_nodes} is negative")
    hidden = _hidden(msg, len(tokens), hidden_dim, first)
    sampling = _sampling(msg.sampling) if msg.HasField("sampling") else None
    feedback = _feedback(msg.feedback, vocab, prev_parents, max_topk) if msg.HasField("feedback") else None
    return VerifierUpdate(tokens, feedback, min(msg.max_nodes, max_nodes), vocab, hidden, sampling)


def _hidden(msg: pb.VerifierUpdate, new_tokens: int, hidden_dim: int, first: bool) -> torch.Tensor | None:
    """The update's hidden states, if any. A drafter that takes them (hidden_dim > 0) needs one finite row
    per committed token whose next token is known: new_tokens - 1 rows on the first update (the newest
    token's successor is pending), then new_tokens rows (the previously pending token's and each new
    one's but the newest)."""
    hidden = None
    rows = new_tokens - first
    if hidden_dim and not msg.HasField("hidden"):
        raise WireError(f"hidden: missing; this drafter takes the target's hidden states [{rows}, {hidden_dim}] here")
    if msg.HasField("hidden"):
        if len(msg.hidden.shape) != 2:
            raise WireError(f"hidden.shape: {quote(list(msg.hidden.shape))} is not [rows, hidden_dim]")
        hidden = msg_to_tensor(msg.hidden, "hidden")
        if hidden_dim and hidden.shape[1] != hidden_dim:
            raise WireError(f"hidden.shape: width {hidden.shape[1]}, this drafter expects {hidden_dim}")
        if hidden.shape[0] > new_tokens:
            raise WireError(f"hidden.shape: {hidden.shape[0]} rows for {new_tokens} new tokens")
        if hidden_dim and hidden.shape[0] != rows:
            raise WireError(
                f"hidden.shape: {hidden.shape[0]} rows for {new_tokens} new tokens; this drafter needs {rows} "
                "(one per committed token whose next token is known: all new tokens, but the newest on the "
                "first update)"
            )
        if hidden_dim and not torch.isfinite(hidden).all():
            raise WireError("hidden.data: NaN or infinite values")
    return hidden


def _sampling(s: pb.SamplingParams) -> SamplingParams:
    if not 0.0 <= s.temperature < math.inf:
        raise WireError(f"sampling.temperature: {s.temperature} is not a finite value >= 0")
    if s.top_k < 0:
        raise WireError(f"sampling.top_k: {s.top_k} is negative")
    if not 0.0 <= s.top_p <= 1.0:
        raise WireError(f"sampling.top_p: {s.top_p} is not in [0, 1]")
    # a temperature too small to divide by is greedy (0): what sampling at it amounts to
    temperature = s.temperature if s.temperature >= MIN_TEMPERATURE else 0.0
    return SamplingParams(temperature, s.top_k, s.top_p or 1.0)


def _feedback(fb: pb.Feedback, vocab: int, prev_parents: tuple[int, ...] | None, max_topk: int) -> Feedback:
    """Feedback answers the previous tree of n nodes, so its sizes are checked against n before any loop
    reads it: at most n accepted nodes and n prob_nodes, at most n + 1 target_topk rows (a node's each,
    and the roots' parent's) of at most max_topk tokens; the work per update is bounded by the tree, not
    by the message size."""
    if prev_parents is None:
        raise WireError("feedback: there was no previous tree in this session")
    n = len(prev_parents)
    for name, count, most in (
        ("accepted", len(fb.accepted), n),
        ("prob_nodes", len(fb.prob_nodes), n),
        ("target_topk", len(fb.target_topk), n + 1),
    ):
        if count > most:
            raise WireError(f"feedback.{name}: {count} entries for the previous tree of {n} nodes (at most {most})")
    if len(fb.prob_nodes) != len(fb.probs):
        raise WireError(f"feedback.probs: {len(fb.probs)} values for {len(fb.prob_nodes)} prob_nodes")
    last = -1
    for i, node in enumerate(fb.accepted):
        if not 0 <= node < n or prev_parents[node] != last:
            raise WireError(
                f"feedback.accepted[{i}]: node {node} does not continue the path "
                f"{quote(list(fb.accepted[:i]))} in the previous tree of {n} nodes"
            )
        last = node
    for i, node in enumerate(fb.prob_nodes):
        if not 0 <= node < n:
            raise WireError(f"feedback.prob_nodes[{i}]: node {node} outside the previous tree of {n} nodes")
    topk = {}
    for i, row in enumerate(fb.target_topk):
        field = f"feedback.target_topk[{i}]"
        if not -1 <= row.node < n:
            raise WireError(f"{field}.node: {row.node} outside the previous tree of {n} nodes")
        if len(row.tokens) > max_topk:
            raise WireError(f"{field}.tokens: {len(row.tokens)} tokens, the server takes at most {max_topk}")
        if len(row.tokens) != len(row.probs):
            raise WireError(f"{field}.probs: {len(row.probs)} values for {len(row.tokens)} tokens")
        topk[row.node] = (_tokens(row.tokens, vocab, f"{field}.tokens"), _probs(row.probs, f"{field}.probs"))
    if not 0 <= fb.verify_ms < 3.6e6:  # NaN fails too
        raise WireError(f"feedback.verify_ms: {fb.verify_ms} is not a time in milliseconds (0 = not measured)")
    probs = dict(zip(fb.prob_nodes, _probs(fb.probs, "feedback.probs")))
    return Feedback(list(fb.accepted), probs, topk, fb.verify_ms)
