from propeller.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetDatasetRequest(_message.Message):
    __slots__ = ("proplet_id", "split")
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    proplet_id: str
    split: str
    def __init__(self, proplet_id: _Optional[str] = ..., split: _Optional[str] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("proplet_id", "schema", "features", "labels", "num_classes")
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    proplet_id: str
    schema: str
    features: _tensor_pb2.Tensor
    labels: _tensor_pb2.Tensor
    num_classes: int
    def __init__(self, proplet_id: _Optional[str] = ..., schema: _Optional[str] = ..., features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class PutDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("proplet_id", "schema", "size", "num_features", "num_classes")
    PROPLET_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    proplet_id: str
    schema: str
    size: int
    num_features: int
    num_classes: int
    def __init__(self, proplet_id: _Optional[str] = ..., schema: _Optional[str] = ..., size: _Optional[int] = ..., num_features: _Optional[int] = ..., num_classes: _Optional[int] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDatasetInfosRequest(_message.Message):
    __slots__ = ("proplet_ids",)
    PROPLET_IDS_FIELD_NUMBER: _ClassVar[int]
    proplet_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, proplet_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetDatasetInfosResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...
