from propeller.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InitModelRequest(_message.Message):
    __slots__ = ("dimension", "dtype")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    dtype: _tensor_pb2.DType
    def __init__(self, dimension: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("version", "model_uri", "chunk_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    model_uri: str
    chunk_size: int
    def __init__(self, version: _Optional[int] = ..., model_uri: _Optional[str] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "model_uri", "sha256", "tensors", "total_bytes", "created_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    model_uri: str
    sha256: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    total_bytes: int
    created_at: float
    def __init__(self, version: _Optional[int] = ..., model_uri: _Optional[str] = ..., sha256: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., created_at: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("header", "sha256", "certificate", "clip_scale", "received_at", "weight")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CLIP_SCALE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    header: _tensor_pb2.UpdateHeader
    sha256: str
    certificate: bytes
    clip_scale: float
    received_at: float
    weight: float
    def __init__(self, header: _Optional[_Union[_tensor_pb2.UpdateHeader, _Mapping]] = ..., sha256: _Optional[str] = ..., certificate: _Optional[bytes] = ..., clip_scale: _Optional[float] = ..., received_at: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class LineageState(_message.Message):
    __slots__ = ("from_version", "tensors", "total_bytes", "sha256", "result_sha256")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RESULT_SHA256_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    total_bytes: int
    sha256: str
    result_sha256: str
    def __init__(self, from_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., result_sha256: _Optional[str] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("version", "model_sha256", "round_id", "base_model_uri", "base_model_sha256", "module_digest", "strategy", "contributions", "experiment_id", "parent_version", "strategy_params_json", "state", "audits")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODULE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FIELD_NUMBER: _ClassVar[int]
    version: int
    model_sha256: str
    round_id: str
    base_model_uri: str
    base_model_sha256: str
    module_digest: str
    strategy: str
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    experiment_id: str
    parent_version: int
    strategy_params_json: str
    state: LineageState
    audits: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.AuditRecord]
    def __init__(self, version: _Optional[int] = ..., model_sha256: _Optional[str] = ..., round_id: _Optional[str] = ..., base_model_uri: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., module_digest: _Optional[str] = ..., strategy: _Optional[str] = ..., contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ..., experiment_id: _Optional[str] = ..., parent_version: _Optional[int] = ..., strategy_params_json: _Optional[str] = ..., state: _Optional[_Union[LineageState, _Mapping]] = ..., audits: _Optional[_Iterable[_Union[_tensor_pb2.AuditRecord, _Mapping]]] = ...) -> None: ...

class LineageChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: Lineage
    data: bytes
    def __init__(self, header: _Optional[_Union[Lineage, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LineageInfo(_message.Message):
    __slots__ = ("version", "round_id", "contributions", "total_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    round_id: str
    contributions: int
    total_bytes: int
    def __init__(self, version: _Optional[int] = ..., round_id: _Optional[str] = ..., contributions: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...
