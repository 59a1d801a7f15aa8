from propeller.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_PENDING: _ClassVar[RoundState]
    ROUND_STATE_OPEN: _ClassVar[RoundState]
    ROUND_STATE_AGGREGATING: _ClassVar[RoundState]
    ROUND_STATE_COMPLETED: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]

class RoundEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_EVENT_TYPE_UNSPECIFIED: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_SNAPSHOT: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_STARTED: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_UPDATE_ACCEPTED: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_AGGREGATING: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_COMPLETED: _ClassVar[RoundEventType]
    ROUND_EVENT_TYPE_FAILED: _ClassVar[RoundEventType]
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_PENDING: RoundState
ROUND_STATE_OPEN: RoundState
ROUND_STATE_AGGREGATING: RoundState
ROUND_STATE_COMPLETED: RoundState
ROUND_STATE_FAILED: RoundState
ROUND_EVENT_TYPE_UNSPECIFIED: RoundEventType
ROUND_EVENT_TYPE_SNAPSHOT: RoundEventType
ROUND_EVENT_TYPE_STARTED: RoundEventType
ROUND_EVENT_TYPE_UPDATE_ACCEPTED: RoundEventType
ROUND_EVENT_TYPE_AGGREGATING: RoundEventType
ROUND_EVENT_TYPE_COMPLETED: RoundEventType
ROUND_EVENT_TYPE_FAILED: RoundEventType

class Hyperparams(_message.Message):
    __slots__ = ("epochs", "lr", "batch_size", "extra_json")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    lr: float
    batch_size: int
    extra_json: str
    def __init__(self, epochs: _Optional[int] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., extra_json: _Optional[str] = ...) -> None: ...

class ConfigureRoundRequest(_message.Message):
    __slots__ = ("round_id", "experiment_id", "participants", "k_of_n", "timeout_s", "model_ref", "hyperparams", "task_wasm_image", "start", "min_k_of_n", "module_digest", "strategy_name", "strategy_params_json", "audit", "fuel_budget", "min_fuel_ratio")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    K_OF_N_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_FIELD_NUMBER: _ClassVar[int]
    TASK_WASM_IMAGE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    MIN_K_OF_N_FIELD_NUMBER: _ClassVar[int]
    MODULE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    FUEL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MIN_FUEL_RATIO_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    experiment_id: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    k_of_n: int
    timeout_s: float
    model_ref: str
    hyperparams: Hyperparams
    task_wasm_image: str
    start: bool
    min_k_of_n: int
    module_digest: str
    strategy_name: str
    strategy_params_json: str
    audit: _tensor_pb2.AuditConfig
    fuel_budget: int
    min_fuel_ratio: float
    def __init__(self, round_id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., k_of_n: _Optional[int] = ..., timeout_s: _Optional[float] = ..., model_ref: _Optional[str] = ..., hyperparams: _Optional[_Union[Hyperparams, _Mapping]] = ..., task_wasm_image: _Optional[str] = ..., start: _Optional[bool] = ..., min_k_of_n: _Optional[int] = ..., module_digest: _Optional[str] = ..., strategy_name: _Optional[str] = ..., strategy_params_json: _Optional[str] = ..., audit: _Optional[_Union[_tensor_pb2.AuditConfig, _Mapping]] = ..., fuel_budget: _Optional[int] = ..., min_fuel_ratio: _Optional[float] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round_id", "experiment_id", "state", "completed", "num_updates", "k_of_n", "participants", "reported", "model_ref", "timeout_s", "hyperparams", "task_wasm_image", "started_at", "deadline", "completed_at", "new_model_version", "new_model_uri", "failure_reason", "closed_by", "metrics", "min_k_of_n", "failed", "module_digest", "base_model_sha256", "strategy_name", "strategy_params_json", "num_samples", "audit", "audits", "fuel_budget", "min_fuel_ratio", "fuel_consumed")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATES_FIELD_NUMBER: _ClassVar[int]
    K_OF_N_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_FIELD_NUMBER: _ClassVar[int]
    TASK_WASM_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MIN_K_OF_N_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    MODULE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FIELD_NUMBER: _ClassVar[int]
    FUEL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MIN_FUEL_RATIO_FIELD_NUMBER: _ClassVar[int]
    FUEL_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    experiment_id: str
    state: RoundState
    completed: bool
    num_updates: int
    k_of_n: int
    participants: _containers.RepeatedScalarFieldContainer[str]
    reported: _containers.RepeatedScalarFieldContainer[str]
    model_ref: str
    timeout_s: float
    hyperparams: Hyperparams
    task_wasm_image: str
    started_at: float
    deadline: float
    completed_at: float
    new_model_version: int
    new_model_uri: str
    failure_reason: str
    closed_by: str
    metrics: _containers.ScalarMap[str, float]
    min_k_of_n: int
    failed: _containers.RepeatedCompositeFieldContainer[ParticipantFailure]
    module_digest: str
    base_model_sha256: str
    strategy_name: str
    strategy_params_json: str
    num_samples: int
    audit: _tensor_pb2.AuditConfig
    audits: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.AuditRecord]
    fuel_budget: int
    min_fuel_ratio: float
    fuel_consumed: int
    def __init__(self, round_id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., state: _Optional[_Union[RoundState, str]] = ..., completed: _Optional[bool] = ..., num_updates: _Optional[int] = ..., k_of_n: _Optional[int] = ..., participants: _Optional[_Iterable[str]] = ..., reported: _Optional[_Iterable[str]] = ..., model_ref: _Optional[str] = ..., timeout_s: _Optional[float] = ..., hyperparams: _Optional[_Union[Hyperparams, _Mapping]] = ..., task_wasm_image: _Optional[str] = ..., started_at: _Optional[float] = ..., deadline: _Optional[float] = ..., completed_at: _Optional[float] = ..., new_model_version: _Optional[int] = ..., new_model_uri: _Optional[str] = ..., failure_reason: _Optional[str] = ..., closed_by: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., min_k_of_n: _Optional[int] = ..., failed: _Optional[_Iterable[_Union[ParticipantFailure, _Mapping]]] = ..., module_digest: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., strategy_name: _Optional[str] = ..., strategy_params_json: _Optional[str] = ..., num_samples: _Optional[int] = ..., audit: _Optional[_Union[_tensor_pb2.AuditConfig, _Mapping]] = ..., audits: _Optional[_Iterable[_Union[_tensor_pb2.AuditRecord, _Mapping]]] = ..., fuel_budget: _Optional[int] = ..., min_fuel_ratio: _Optional[float] = ..., fuel_consumed: _Optional[int] = ...) -> None: ...

class ParticipantFailure(_message.Message):
    __slots__ = ("proplet_id", "reason")
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    proplet_id: str
    reason: str
    def __init__(self, proplet_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportParticipantFailureRequest(_message.Message):
    __slots__ = ("round_id", "proplet_id", "reason", "brief")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BRIEF_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    proplet_id: str
    reason: str
    brief: bool
    def __init__(self, round_id: _Optional[str] = ..., proplet_id: _Optional[str] = ..., reason: _Optional[str] = ..., brief: _Optional[bool] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("round_id", "proplet_id", "accepted", "duplicate", "num_updates", "k_of_n", "state")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATES_FIELD_NUMBER: _ClassVar[int]
    K_OF_N_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    proplet_id: str
    accepted: bool
    duplicate: bool
    num_updates: int
    k_of_n: int
    state: RoundState
    def __init__(self, round_id: _Optional[str] = ..., proplet_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., num_updates: _Optional[int] = ..., k_of_n: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ...) -> None: ...

class GetRoundStatusRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("experiment_id", "page_size", "page_token")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    page_size: int
    page_token: str
    def __init__(self, experiment_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds", "next_page_token")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    next_page_token: str
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRoundRequest(_message.Message):
    __slots__ = ("round_id", "brief")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BRIEF_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    brief: bool
    def __init__(self, round_id: _Optional[str] = ..., brief: _Optional[bool] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("type", "status", "proplet_id", "timestamp")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    type: RoundEventType
    status: RoundStatus
    proplet_id: str
    timestamp: float
    def __init__(self, type: _Optional[_Union[RoundEventType, str]] = ..., status: _Optional[_Union[RoundStatus, _Mapping]] = ..., proplet_id: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...
