from propeller.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_FEDAVG: _ClassVar[Strategy]
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_FEDAVG: Strategy

class AggregateHeader(_message.Message):
    __slots__ = ("strategy", "round_id", "strategy_name", "strategy_params_json")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    strategy: Strategy
    round_id: str
    strategy_name: str
    strategy_params_json: str
    def __init__(self, strategy: _Optional[_Union[Strategy, str]] = ..., round_id: _Optional[str] = ..., strategy_name: _Optional[str] = ..., strategy_params_json: _Optional[str] = ...) -> None: ...

class AggregateChunk(_message.Message):
    __slots__ = ("header", "update", "data", "base", "state")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    header: AggregateHeader
    update: _tensor_pb2.UpdateHeader
    data: bytes
    base: _tensor_pb2.ModelHeader
    state: _tensor_pb2.ModelHeader
    def __init__(self, header: _Optional[_Union[AggregateHeader, _Mapping]] = ..., update: _Optional[_Union[_tensor_pb2.UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., base: _Optional[_Union[_tensor_pb2.ModelHeader, _Mapping]] = ..., state: _Optional[_Union[_tensor_pb2.ModelHeader, _Mapping]] = ...) -> None: ...
