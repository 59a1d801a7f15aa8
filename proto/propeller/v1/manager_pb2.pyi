from propeller.v1 import coordinator_pb2 as _coordinator_pb2
from propeller.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MetricSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_SOURCE_UNSPECIFIED: _ClassVar[MetricSource]
    METRIC_SOURCE_EVALUATION: _ClassVar[MetricSource]
    METRIC_SOURCE_TRAINING: _ClassVar[MetricSource]

class MetricGoal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_GOAL_UNSPECIFIED: _ClassVar[MetricGoal]
    METRIC_GOAL_MINIMIZE: _ClassVar[MetricGoal]
    METRIC_GOAL_MAXIMIZE: _ClassVar[MetricGoal]

class ExperimentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_STATE_UNSPECIFIED: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_RUNNING: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_COMPLETED: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_STOPPED: _ClassVar[ExperimentState]
    EXPERIMENT_STATE_FAILED: _ClassVar[ExperimentState]

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    END_REASON_MAX_ROUNDS: _ClassVar[EndReason]
    END_REASON_TARGET_REACHED: _ClassVar[EndReason]
    END_REASON_PLATEAU: _ClassVar[EndReason]
    END_REASON_STOPPED: _ClassVar[EndReason]
    END_REASON_FAILED: _ClassVar[EndReason]

class ExperimentEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_EVENT_TYPE_UNSPECIFIED: _ClassVar[ExperimentEventType]
    EXPERIMENT_EVENT_TYPE_SNAPSHOT: _ClassVar[ExperimentEventType]
    EXPERIMENT_EVENT_TYPE_ROUND_STARTED: _ClassVar[ExperimentEventType]
    EXPERIMENT_EVENT_TYPE_ROUND_FINISHED: _ClassVar[ExperimentEventType]
    EXPERIMENT_EVENT_TYPE_ENDED: _ClassVar[ExperimentEventType]
    EXPERIMENT_EVENT_TYPE_ROUND_EVALUATED: _ClassVar[ExperimentEventType]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_PENDING: _ClassVar[TaskState]
    TASK_STATE_SCHEDULED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_COMPLETED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_SKIPPED: _ClassVar[TaskState]
    TASK_STATE_INTERRUPTED: _ClassVar[TaskState]
METRIC_SOURCE_UNSPECIFIED: MetricSource
METRIC_SOURCE_EVALUATION: MetricSource
METRIC_SOURCE_TRAINING: MetricSource
METRIC_GOAL_UNSPECIFIED: MetricGoal
METRIC_GOAL_MINIMIZE: MetricGoal
METRIC_GOAL_MAXIMIZE: MetricGoal
EXPERIMENT_STATE_UNSPECIFIED: ExperimentState
EXPERIMENT_STATE_RUNNING: ExperimentState
EXPERIMENT_STATE_COMPLETED: ExperimentState
EXPERIMENT_STATE_STOPPED: ExperimentState
EXPERIMENT_STATE_FAILED: ExperimentState
END_REASON_UNSPECIFIED: EndReason
END_REASON_MAX_ROUNDS: EndReason
END_REASON_TARGET_REACHED: EndReason
END_REASON_PLATEAU: EndReason
END_REASON_STOPPED: EndReason
END_REASON_FAILED: EndReason
EXPERIMENT_EVENT_TYPE_UNSPECIFIED: ExperimentEventType
EXPERIMENT_EVENT_TYPE_SNAPSHOT: ExperimentEventType
EXPERIMENT_EVENT_TYPE_ROUND_STARTED: ExperimentEventType
EXPERIMENT_EVENT_TYPE_ROUND_FINISHED: ExperimentEventType
EXPERIMENT_EVENT_TYPE_ENDED: ExperimentEventType
EXPERIMENT_EVENT_TYPE_ROUND_EVALUATED: ExperimentEventType
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_PENDING: TaskState
TASK_STATE_SCHEDULED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_COMPLETED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_SKIPPED: TaskState
TASK_STATE_INTERRUPTED: TaskState

class StartExperimentRequest(_message.Message):
    __slots__ = ("experiment_id", "round_id", "model_ref", "participants", "hyperparams", "k_of_n", "timeout_s", "task_wasm_image", "min_k_of_n", "module_digest", "rounds", "strategy_name", "strategy_params_json", "all_alive", "sampling", "k_fraction", "evaluation", "stopping", "audit", "fuel_budget", "min_fuel_ratio")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_FIELD_NUMBER: _ClassVar[int]
    K_OF_N_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    TASK_WASM_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MIN_K_OF_N_FIELD_NUMBER: _ClassVar[int]
    MODULE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    ALL_ALIVE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    K_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    FUEL_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MIN_FUEL_RATIO_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    round_id: str
    model_ref: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    hyperparams: _coordinator_pb2.Hyperparams
    k_of_n: int
    timeout_s: float
    task_wasm_image: str
    min_k_of_n: int
    module_digest: str
    rounds: int
    strategy_name: str
    strategy_params_json: str
    all_alive: bool
    sampling: Sampling
    k_fraction: float
    evaluation: EvaluationPlan
    stopping: StoppingRule
    audit: _tensor_pb2.AuditConfig
    fuel_budget: int
    min_fuel_ratio: float
    def __init__(self, experiment_id: _Optional[str] = ..., round_id: _Optional[str] = ..., model_ref: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., hyperparams: _Optional[_Union[_coordinator_pb2.Hyperparams, _Mapping]] = ..., k_of_n: _Optional[int] = ..., timeout_s: _Optional[float] = ..., task_wasm_image: _Optional[str] = ..., min_k_of_n: _Optional[int] = ..., module_digest: _Optional[str] = ..., rounds: _Optional[int] = ..., strategy_name: _Optional[str] = ..., strategy_params_json: _Optional[str] = ..., all_alive: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., k_fraction: _Optional[float] = ..., evaluation: _Optional[_Union[EvaluationPlan, _Mapping]] = ..., stopping: _Optional[_Union[StoppingRule, _Mapping]] = ..., audit: _Optional[_Union[_tensor_pb2.AuditConfig, _Mapping]] = ..., fuel_budget: _Optional[int] = ..., min_fuel_ratio: _Optional[float] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("fraction", "count", "min_available", "seed")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    count: int
    min_available: int
    seed: int
    def __init__(self, fraction: _Optional[float] = ..., count: _Optional[int] = ..., min_available: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class EvaluationPlan(_message.Message):
    __slots__ = ("every_rounds", "fraction", "timeout_s")
    EVERY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    every_rounds: int
    fraction: float
    timeout_s: float
    def __init__(self, every_rounds: _Optional[int] = ..., fraction: _Optional[float] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class StoppingRule(_message.Message):
    __slots__ = ("metric", "source", "goal", "target", "patience_rounds", "min_delta")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    metric: str
    source: MetricSource
    goal: MetricGoal
    target: float
    patience_rounds: int
    min_delta: float
    def __init__(self, metric: _Optional[str] = ..., source: _Optional[_Union[MetricSource, str]] = ..., goal: _Optional[_Union[MetricGoal, str]] = ..., target: _Optional[float] = ..., patience_rounds: _Optional[int] = ..., min_delta: _Optional[float] = ...) -> None: ...

class ScheduledParticipant(_message.Message):
    __slots__ = ("proplet_id", "task_id", "task_name")
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    proplet_id: str
    task_id: str
    task_name: str
    def __init__(self, proplet_id: _Optional[str] = ..., task_id: _Optional[str] = ..., task_name: _Optional[str] = ...) -> None: ...

class SkippedParticipant(_message.Message):
    __slots__ = ("proplet_id", "reason")
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    proplet_id: str
    reason: str
    def __init__(self, proplet_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StartExperimentResponse(_message.Message):
    __slots__ = ("experiment_id", "round_id", "round", "scheduled", "skipped")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    round_id: str
    round: _coordinator_pb2.RoundStatus
    scheduled: _containers.RepeatedCompositeFieldContainer[ScheduledParticipant]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedParticipant]
    def __init__(self, experiment_id: _Optional[str] = ..., round_id: _Optional[str] = ..., round: _Optional[_Union[_coordinator_pb2.RoundStatus, _Mapping]] = ..., scheduled: _Optional[_Iterable[_Union[ScheduledParticipant, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedParticipant, _Mapping]]] = ...) -> None: ...

class ExperimentEnd(_message.Message):
    __slots__ = ("reason", "round", "round_id", "detail", "ended_at")
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    reason: EndReason
    round: int
    round_id: str
    detail: str
    ended_at: float
    def __init__(self, reason: _Optional[_Union[EndReason, str]] = ..., round: _Optional[int] = ..., round_id: _Optional[str] = ..., detail: _Optional[str] = ..., ended_at: _Optional[float] = ...) -> None: ...

class ExperimentRound(_message.Message):
    __slots__ = ("index", "round_id", "model_ref", "new_model_version", "new_model_uri", "sampled", "reported", "closed_by", "state", "failure_reason", "train_metrics", "eval_metrics", "eval_num_samples", "evaluated", "eval_missing", "started_at", "finished_at")
    class TrainMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class EvalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    TRAIN_METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    EVAL_MISSING_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    index: int
    round_id: str
    model_ref: str
    new_model_version: int
    new_model_uri: str
    sampled: _containers.RepeatedScalarFieldContainer[str]
    reported: _containers.RepeatedScalarFieldContainer[str]
    closed_by: str
    state: _coordinator_pb2.RoundState
    failure_reason: str
    train_metrics: _containers.ScalarMap[str, float]
    eval_metrics: _containers.ScalarMap[str, float]
    eval_num_samples: int
    evaluated: _containers.RepeatedScalarFieldContainer[str]
    eval_missing: _containers.RepeatedCompositeFieldContainer[SkippedParticipant]
    started_at: float
    finished_at: float
    def __init__(self, index: _Optional[int] = ..., round_id: _Optional[str] = ..., model_ref: _Optional[str] = ..., new_model_version: _Optional[int] = ..., new_model_uri: _Optional[str] = ..., sampled: _Optional[_Iterable[str]] = ..., reported: _Optional[_Iterable[str]] = ..., closed_by: _Optional[str] = ..., state: _Optional[_Union[_coordinator_pb2.RoundState, str]] = ..., failure_reason: _Optional[str] = ..., train_metrics: _Optional[_Mapping[str, float]] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ..., eval_num_samples: _Optional[int] = ..., evaluated: _Optional[_Iterable[str]] = ..., eval_missing: _Optional[_Iterable[_Union[SkippedParticipant, _Mapping]]] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("experiment_id", "config", "scheduled", "skipped", "created_at", "state", "end", "current_round", "rounds", "rounds_omitted")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    config: StartExperimentRequest
    scheduled: _containers.RepeatedCompositeFieldContainer[ScheduledParticipant]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedParticipant]
    created_at: float
    state: ExperimentState
    end: ExperimentEnd
    current_round: int
    rounds: _containers.RepeatedCompositeFieldContainer[ExperimentRound]
    rounds_omitted: int
    def __init__(self, experiment_id: _Optional[str] = ..., config: _Optional[_Union[StartExperimentRequest, _Mapping]] = ..., scheduled: _Optional[_Iterable[_Union[ScheduledParticipant, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedParticipant, _Mapping]]] = ..., created_at: _Optional[float] = ..., state: _Optional[_Union[ExperimentState, str]] = ..., end: _Optional[_Union[ExperimentEnd, _Mapping]] = ..., current_round: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[ExperimentRound, _Mapping]]] = ..., rounds_omitted: _Optional[int] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class StopExperimentRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class WatchExperimentRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class ExperimentEvent(_message.Message):
    __slots__ = ("type", "experiment", "round", "timestamp")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    type: ExperimentEventType
    experiment: Experiment
    round: ExperimentRound
    timestamp: float
    def __init__(self, type: _Optional[_Union[ExperimentEventType, str]] = ..., experiment: _Optional[_Union[Experiment, _Mapping]] = ..., round: _Optional[_Union[ExperimentRound, _Mapping]] = ..., timestamp: _Optional[float] = ...) -> None: ...

class ListExperimentRoundsRequest(_message.Message):
    __slots__ = ("experiment_id", "page_size", "page_token")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    page_size: int
    page_token: str
    def __init__(self, experiment_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExperimentRoundsResponse(_message.Message):
    __slots__ = ("rounds", "next_page_token")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[ExperimentRound]
    next_page_token: str
    def __init__(self, rounds: _Optional[_Iterable[_Union[ExperimentRound, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments", "next_page_token")
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    next_page_token: str
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Proplet(_message.Message):
    __slots__ = ("id", "name", "alive", "last_seen", "registered_at", "metadata", "task_count")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    alive: bool
    last_seen: float
    registered_at: float
    metadata: _containers.ScalarMap[str, str]
    task_count: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., alive: _Optional[bool] = ..., last_seen: _Optional[float] = ..., registered_at: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., task_count: _Optional[int] = ...) -> None: ...

class ListPropletsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPropletsResponse(_message.Message):
    __slots__ = ("proplets", "next_page_token")
    PROPLETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    proplets: _containers.RepeatedCompositeFieldContainer[Proplet]
    next_page_token: str
    def __init__(self, proplets: _Optional[_Iterable[_Union[Proplet, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetPropletRequest(_message.Message):
    __slots__ = ("proplet_id",)
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    proplet_id: str
    def __init__(self, proplet_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "name", "image_url", "file", "env", "cli_args", "proplet_id", "state", "results", "error", "created_at", "updated_at", "started_at", "finished_at")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CLI_ARGS_FIELD_NUMBER: _ClassVar[int]
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    image_url: str
    file: bytes
    env: _containers.ScalarMap[str, str]
    cli_args: _containers.RepeatedScalarFieldContainer[str]
    proplet_id: str
    state: TaskState
    results: str
    error: str
    created_at: float
    updated_at: float
    started_at: float
    finished_at: float
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., image_url: _Optional[str] = ..., file: _Optional[bytes] = ..., env: _Optional[_Mapping[str, str]] = ..., cli_args: _Optional[_Iterable[str]] = ..., proplet_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., results: _Optional[str] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ...) -> None: ...

class CreateTaskRequest(_message.Message):
    __slots__ = ("name", "image_url", "file", "env", "cli_args", "proplet_id")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CLI_ARGS_FIELD_NUMBER: _ClassVar[int]
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    image_url: str
    file: bytes
    env: _containers.ScalarMap[str, str]
    cli_args: _containers.RepeatedScalarFieldContainer[str]
    proplet_id: str
    def __init__(self, name: _Optional[str] = ..., image_url: _Optional[str] = ..., file: _Optional[bytes] = ..., env: _Optional[_Mapping[str, str]] = ..., cli_args: _Optional[_Iterable[str]] = ..., proplet_id: _Optional[str] = ...) -> None: ...

class TaskRef(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("name_prefix", "proplet_id", "state", "page_size", "page_token")
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name_prefix: str
    proplet_id: str
    state: TaskState
    page_size: int
    page_token: str
    def __init__(self, name_prefix: _Optional[str] = ..., proplet_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
