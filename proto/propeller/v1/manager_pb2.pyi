from propeller.v1 import coordinator_pb2 as _coordinator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_PENDING: TaskState
TASK_STATE_SCHEDULED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_COMPLETED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_SKIPPED: TaskState
TASK_STATE_INTERRUPTED: TaskState

class StartExperimentRequest(_message.Message):
    __slots__ = ("experiment_id", "round_id", "model_ref", "participants", "hyperparams", "k_of_n", "timeout_s", "task_wasm_image", "min_k_of_n", "module_digest")
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
    def __init__(self, experiment_id: _Optional[str] = ..., round_id: _Optional[str] = ..., model_ref: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., hyperparams: _Optional[_Union[_coordinator_pb2.Hyperparams, _Mapping]] = ..., k_of_n: _Optional[int] = ..., timeout_s: _Optional[float] = ..., task_wasm_image: _Optional[str] = ..., min_k_of_n: _Optional[int] = ..., module_digest: _Optional[str] = ...) -> None: ...

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

class Experiment(_message.Message):
    __slots__ = ("experiment_id", "config", "scheduled", "skipped", "created_at")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    config: StartExperimentRequest
    scheduled: _containers.RepeatedCompositeFieldContainer[ScheduledParticipant]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedParticipant]
    created_at: float
    def __init__(self, experiment_id: _Optional[str] = ..., config: _Optional[_Union[StartExperimentRequest, _Mapping]] = ..., scheduled: _Optional[_Iterable[_Union[ScheduledParticipant, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedParticipant, _Mapping]]] = ..., created_at: _Optional[float] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

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
