"""DataStore servicer: proto <-> domain translation around the dataset store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from propeller.v1 import datastore_pb2, datastore_pb2_grpc
from server.datastore.datasets import (
    CLASSES_SCHEMA,
    SCHEMA,
    Dataset,
    check_split,
    dataset_split,
    split_size,
    validate_dataset,
)
from server.datastore.store import DatasetStore, DatasetSummary, summary_of
from server.errors import InvalidArgument, NotFound, grpc_errors
from server.grpc_server import Context, ServiceBinding
from server.ids import check_id, check_ids, check_name
from server.paging import PageRequest, page_of
from server.tensors import offload_if_big, tensor_from_proto, tensor_to_proto
from server.wire import message_from

log = logging.getLogger(__name__)

SERVICE_NAME = "propeller.v1.DataStore"
# The most proplet ids one GetDatasetInfos call may name.
MAX_INFOS = 1000


def dataset_info_proto(summary: DatasetSummary) -> datastore_pb2.DatasetInfo:
    return message_from(datastore_pb2.DatasetInfo, summary)


def dataset_proto(dataset: Dataset) -> datastore_pb2.Dataset:
    return message_from(
        datastore_pb2.Dataset,
        dataset,
        features=tensor_to_proto(dataset.features),
        labels=tensor_to_proto(dataset.labels),
    )


def dataset_from_proto(msg: datastore_pb2.Dataset, field: str = "dataset") -> Dataset:
    """Decode and validate; InvalidArgument naming the field otherwise."""
    check_id(msg.proplet_id, f"{field}.proplet_id")
    check_name(msg.schema, f"{field}.schema", optional=True)
    if not msg.HasField("features"):
        raise InvalidArgument(f"{field}.features: required")
    if not msg.HasField("labels"):
        raise InvalidArgument(f"{field}.labels: required")
    schema = msg.schema or SCHEMA
    # 0 on the binary schema means its 2 classes (a client that predates the field);
    # validation refuses any other count for it.
    num_classes = msg.num_classes if schema == CLASSES_SCHEMA or msg.num_classes else 2
    dataset = Dataset(
        proplet_id=msg.proplet_id,
        features=tensor_from_proto(msg.features, f"{field}.features"),
        labels=tensor_from_proto(msg.labels, f"{field}.labels"),
        schema=schema,
        num_classes=num_classes,
    )
    return validate_dataset(dataset, field)


class DataStoreServicer:
    """`store_of()` is the store to use (the app opens it on entry)."""

    def __init__(self, store_of: Callable[[], DatasetStore]) -> None:
        self.store_of = store_of

    async def _dataset(self, request: datastore_pb2.GetDatasetRequest) -> Dataset:
        check_id(request.proplet_id, "proplet_id")
        check_split(request.split)
        dataset = await self.store_of().get(request.proplet_id)
        if dataset is None:
            raise NotFound(f"proplet_id: no dataset for {request.proplet_id!r}")
        return dataset

    async def GetDataset(
        self, request: datastore_pb2.GetDatasetRequest, context: Context
    ) -> datastore_pb2.Dataset:
        async with grpc_errors(context, "DataStore.GetDataset"):
            dataset = await self._dataset(request)
            # Selecting a part copies the arrays: off the event loop for big datasets.
            part = await offload_if_big(
                dataset.features.nbytes, dataset_split, dataset, request.split
            )
            return dataset_proto(part)

    async def GetDatasetInfo(
        self, request: datastore_pb2.GetDatasetRequest, context: Context
    ) -> datastore_pb2.DatasetInfo:
        async with grpc_errors(context, "DataStore.GetDatasetInfo"):
            summary = summary_of(await self._dataset(request))
            size = split_size(summary.proplet_id, summary.size, request.split)
            return dataset_info_proto(replace(summary, size=size))

    async def GetDatasetInfos(
        self, request: datastore_pb2.GetDatasetInfosRequest, context: Context
    ) -> datastore_pb2.GetDatasetInfosResponse:
        async with grpc_errors(context, "DataStore.GetDatasetInfos"):
            check_ids(request.proplet_ids, "proplet_ids", MAX_INFOS)
            if not request.proplet_ids:
                raise InvalidArgument("proplet_ids: must not be empty")
            found = await self.store_of().summaries(request.proplet_ids)
            return datastore_pb2.GetDatasetInfosResponse(
                datasets=[dataset_info_proto(s) for s in found]
            )

    async def PutDataset(
        self, request: datastore_pb2.PutDatasetRequest, context: Context
    ) -> datastore_pb2.DatasetInfo:
        async with grpc_errors(context, "DataStore.PutDataset"):
            if not request.HasField("dataset"):
                raise InvalidArgument("dataset: required")
            # Decoding and validation touch every value: off the event loop for big datasets.
            dataset = await asyncio.to_thread(dataset_from_proto, request.dataset)
            await self.store_of().put(dataset)
            log.info(
                "[DataStore.PutDataset] proplet_id=%s schema=%s size=%d num_features=%d "
                "num_classes=%d",
                dataset.proplet_id,
                dataset.schema,
                dataset.size,
                dataset.num_features,
                dataset.num_classes,
            )
            return dataset_info_proto(summary_of(dataset))

    async def ListDatasets(
        self, request: datastore_pb2.ListDatasetsRequest, context: Context
    ) -> datastore_pb2.ListDatasetsResponse:
        async with grpc_errors(context, "DataStore.ListDatasets"):
            wanted = PageRequest.of(request, "ListDatasets", str)
            datasets = await self.store_of().list()  # sorted by proplet id
            page = page_of(
                wanted.keyed(datasets, lambda d: d.proplet_id), wanted, dataset_info_proto
            )
            return datastore_pb2.ListDatasetsResponse(
                datasets=page.items, next_page_token=page.next_page_token
            )


def binding(store_of: Callable[[], DatasetStore]) -> ServiceBinding:
    return ServiceBinding(
        SERVICE_NAME,
        DataStoreServicer(store_of),
        datastore_pb2_grpc.add_DataStoreServicer_to_server,
    )
