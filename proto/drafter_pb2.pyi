from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("node", "tokens", "probs")
    NODE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    node: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, node: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("accepted", "prob_nodes", "probs", "target_topk", "verify_ms")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROB_NODES_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOPK_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    accepted: _containers.RepeatedScalarFieldContainer[int]
    prob_nodes: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    target_topk: _containers.RepeatedCompositeFieldContainer[TopK]
    verify_ms: float
    def __init__(self, accepted: _Optional[_Iterable[int]] = ..., prob_nodes: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ..., target_topk: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., verify_ms: _Optional[float] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class VerifierUpdate(_message.Message):
    __slots__ = ("vocab_size", "client_label", "round", "new_tokens", "hidden", "feedback", "sampling", "max_nodes")
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LABEL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    client_label: str
    round: int
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    feedback: Feedback
    sampling: SamplingParams
    max_nodes: int
    def __init__(self, vocab_size: _Optional[int] = ..., client_label: _Optional[str] = ..., round: _Optional[int] = ..., new_tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., feedback: _Optional[_Union[Feedback, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_nodes: _Optional[int] = ...) -> None: ...

class DraftTree(_message.Message):
    __slots__ = ("session_id", "round", "tokens", "parents", "draft_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    draft_ms: float
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., draft_ms: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("api_version", "server_version", "drafter", "model", "vocab_size", "draft_vocab_size", "hidden_dim", "tree_builders", "max_nodes", "max_sessions", "auth_required")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    TREE_BUILDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    api_version: str
    server_version: str
    drafter: str
    model: str
    vocab_size: int
    draft_vocab_size: int
    hidden_dim: int
    tree_builders: _containers.RepeatedScalarFieldContainer[str]
    max_nodes: int
    max_sessions: int
    auth_required: bool
    def __init__(self, api_version: _Optional[str] = ..., server_version: _Optional[str] = ..., drafter: _Optional[str] = ..., model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., draft_vocab_size: _Optional[int] = ..., hidden_dim: _Optional[int] = ..., tree_builders: _Optional[_Iterable[str]] = ..., max_nodes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., auth_required: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("sessions_open", "sessions_total", "sessions_evicted", "rounds_total", "rounds_per_s", "mean_nodes", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "errors", "uptime_s", "feedback_rounds", "accepted_tokens", "bandit", "arms")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BanditEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EVICTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_NODES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P90_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BANDIT_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    sessions_open: int
    sessions_total: int
    sessions_evicted: int
    rounds_total: int
    rounds_per_s: float
    mean_nodes: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    errors: _containers.ScalarMap[str, int]
    uptime_s: float
    feedback_rounds: int
    accepted_tokens: int
    bandit: _containers.ScalarMap[str, float]
    arms: _containers.RepeatedCompositeFieldContainer[ClientArms]
    def __init__(self, sessions_open: _Optional[int] = ..., sessions_total: _Optional[int] = ..., sessions_evicted: _Optional[int] = ..., rounds_total: _Optional[int] = ..., rounds_per_s: _Optional[float] = ..., mean_nodes: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p90_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., errors: _Optional[_Mapping[str, int]] = ..., uptime_s: _Optional[float] = ..., feedback_rounds: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., bandit: _Optional[_Mapping[str, float]] = ..., arms: _Optional[_Iterable[_Union[ClientArms, _Mapping]]] = ...) -> None: ...

class ClientArms(_message.Message):
    __slots__ = ("client", "arm", "why", "tokens_per_s", "rounds")
    class TokensPerSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RoundsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    client: str
    arm: str
    why: str
    tokens_per_s: _containers.ScalarMap[str, float]
    rounds: _containers.ScalarMap[str, float]
    def __init__(self, client: _Optional[str] = ..., arm: _Optional[str] = ..., why: _Optional[str] = ..., tokens_per_s: _Optional[_Mapping[str, float]] = ..., rounds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SessionStatsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session_id", "client_label", "rounds", "tokens", "mean_nodes", "mean_accepted", "idle_s", "arm", "arm_why")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LABEL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_NODES_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    ARM_WHY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    client_label: str
    rounds: int
    tokens: int
    mean_nodes: float
    mean_accepted: float
    idle_s: float
    arm: str
    arm_why: str
    def __init__(self, session_id: _Optional[str] = ..., client_label: _Optional[str] = ..., rounds: _Optional[int] = ..., tokens: _Optional[int] = ..., mean_nodes: _Optional[float] = ..., mean_accepted: _Optional[float] = ..., idle_s: _Optional[float] = ..., arm: _Optional[str] = ..., arm_why: _Optional[str] = ...) -> None: ...
