"""Helper processes for the benchmarks: `python -m benchmarks.child KIND ARGS_JSON`.

Every kind prints one JSON line when it is ready (its addresses, or its result), runs until
its stdin closes, then prints a last JSON line with its peak RSS and exits. Servers run in
their own process so that the client under measurement and the server each get a core.

Kinds:
- `stack`: the five services (`server.stack.Stack`) on real mosquitto;
- `bare`: a bare grpc.aio server of raw bytes, the baseline: `bench.Bare/Sink` (client
  stream -> one small answer) and `bench.Bare/Source` (one request -> a stream of chunks);
- `ingest`: a Coordinator (memory or SQLite store) with open rounds that never close;
- `registry`: a ModelRegistry (SQLite state dir) holding one model of the given size;
- `aggmem`: one aggregation of K lazily generated updates through the coordinator's gRPC
  backend and a real Aggregator, in this process; reports time and peak RSS;
- fleet (`benchmarks/fleet.py`, plaintext): `services` (registry, data store seeded with
  the fleet's datasets, aggregator), `coordinator` (flat, root or site), `manager`, and
  `fleet` (many real proplets in one process sharing one wasmtime engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, overload

import grpc
import numpy as np

from benchmarks.common import Json, peak_rss_kib, write_line
from proplet.app import Proplet
from proplet.config import PropletConfig
from proplet.runner import WasmRuntime
from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.aggregator.client import Aggregated
from server.aggregator.service import binding as aggregator_binding
from server.aggregator.strategies import strategy_class
from server.config import Endpoints, MqttConfig
from server.coordinator import rounds as R
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.coordinator.backend import FEDAVG, StrategyRun
from server.coordinator.clients import GrpcModelBackend
from server.coordinator.coordinator import BaseModel, Coordinator, Lineage
from server.coordinator.pg_store import PostgresRoundStore
from server.coordinator.service import binding as coordinator_binding
from server.coordinator.store import MemoryRoundStore, RoundStore, RoundUpdates, SqliteRoundStore
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.errors import FailedPrecondition, Unavailable
from server.grpc_server import serving
from server.lifecycle import ServiceApp
from server.manager.app import ManagerApp, ManagerConfig
from server.pki import CertificateAuthority
from server.registry.app import RegistryApp, RegistryConfig
from server.round_spec import RoundSpec
from server.stack import Stack, StackConfig, service_tls
from server.streams import Payload
from server.tensors import GRPC_OPTIONS, Spec, Tensors, sha256_of
from server.topics import Topics

BARE_SERVICE = "bench.Bare"


async def stdin_closed() -> None:
    """Returns when the parent closes our stdin (or dies)."""
    await asyncio.to_thread(sys.stdin.buffer.read)


def model_bytes(total: int, seed: int = 0) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The float32 values both the subject and the baseline serve (same bytes)."""
    return np.random.default_rng(seed).standard_normal(total // 4, dtype=np.float32)


# ---- stack --------------------------------------------------------------------------------


async def run_stack(args: Json) -> None:
    mqtt = MqttConfig(port=int(args["mqtt_port"]), topics=Topics(args["domain"], "fl"))
    ids = tuple(f"{args['id_prefix']}{i}" for i in range(int(args["proplets"])))
    config = StackConfig(
        mqtt=mqtt,
        seed_proplet_ids=ids,
        num_samples=int(args.get("num_samples", 64)),
        num_features=int(args.get("num_features", 3)),
        alive_window_s=float(args.get("alive_window_s", 3600)),
        # Mutual TLS from the CA in this directory ("": plaintext).
        ca_dir=Path(args["ca_dir"]) if args.get("ca_dir") else None,
    )
    async with Stack(config) as stack:
        e = stack.endpoints
        write_line(
            sys.stdout,
            {
                "manager": e.manager,
                "coordinator": e.coordinator,
                "aggregator": e.aggregator,
                "registry": e.registry,
                "datastore": e.datastore,
            },
        )
        await stdin_closed()


# ---- bare baseline server -------------------------------------------------------------------


def bare_handler(chunks: Sequence[bytes]) -> grpc.GenericRpcHandler[Any, Any]:
    """No (de)serializers: requests and responses are the raw message bytes."""

    async def sink(requests: AsyncIterator[bytes], context: Any) -> bytes:
        total = count = 0
        async for message in requests:
            total += len(message)
            count += 1
        return struct.pack("<QQ", total, count)

    async def source(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return grpc.method_handlers_generic_handler(
        BARE_SERVICE,
        {
            "Sink": grpc.stream_unary_rpc_method_handler(sink),
            "Source": grpc.unary_stream_rpc_method_handler(source),
        },
    )


async def run_bare(args: Json) -> None:
    chunk = int(args.get("chunk", 1 << 20))
    payload = model_bytes(int(args.get("source_bytes", 0))).tobytes()
    chunks = [payload[i : i + chunk] for i in range(0, len(payload), chunk)]
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((bare_handler(chunks),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        write_line(sys.stdout, {"addr": f"127.0.0.1:{port}"})
        await stdin_closed()
    finally:
        await server.stop(1)


# ---- coordinator for ingestion ----------------------------------------------------------------


def zeros_model(specs: Sequence[Spec]) -> Tensors:
    """The base model of the ingestion rounds: zeros of the round's specs."""
    return {s.name: np.zeros(s.shape, s.dtype) for s in specs}


class FixedModels:
    """A `ModelBackend` whose base models are zeros of the rounds' specs: the ingestion
    rounds never close, so nothing is aggregated or stored."""

    def __init__(self, specs: dict[str, list[Spec]]) -> None:
        self.specs = specs
        self.bases = {uri: zeros_model(s) for uri, s in specs.items()}

    async def resolve(self, model_ref: str) -> BaseModel:
        return BaseModel(model_ref, self.specs[model_ref], sha256_of(self.bases[model_ref]))

    async def base_tensors(self, model_uri: str) -> Tensors:
        return self.bases[model_uri]

    async def put_lineage(self, lineage: Lineage) -> None:
        raise FailedPrecondition("the ingestion benchmark does not store lineages")

    async def aggregate(
        self, round_id: str, updates: RoundUpdates, run: StrategyRun = FEDAVG
    ) -> Aggregated:
        raise FailedPrecondition("the ingestion benchmark does not aggregate")

    async def put(self, tensors: Tensors, sha256: str) -> tuple[int, str]:
        raise FailedPrecondition("the ingestion benchmark does not store models")

    async def find(self, sha256: str, after_version: int) -> tuple[int, str] | None:
        return None


def specs_from_args(raw: list[list[Any]]) -> list[Spec]:
    return [Spec(str(n), np.dtype(str(d)), tuple(int(x) for x in shape)) for n, d, shape in raw]


async def _nothing(topic: str, payload: bytes) -> None:
    return None


def ca_of(args: Json) -> CertificateAuthority | None:
    """The CA in args["ca_dir"] (mutual TLS), or None ("" or absent: plaintext)."""
    return CertificateAuthority(Path(args["ca_dir"])) if args.get("ca_dir") else None


async def run_ingest(args: Json) -> None:
    rounds: list[Json] = args["rounds"]
    backend = FixedModels({r["model_ref"]: specs_from_args(r["tensors"]) for r in rounds})
    store: RoundStore
    sqlite: SqliteRoundStore | PostgresRoundStore | None = None
    if args.get("database_url"):
        sqlite = PostgresRoundStore(str(args["database_url"]))
        await sqlite.open()
        store = sqlite
    elif args.get("state_dir"):
        sqlite = SqliteRoundStore.in_dir(Path(args["state_dir"]))
        await sqlite.open()
        store = sqlite
    else:
        store = MemoryRoundStore()
    coordinator = Coordinator(store, backend, _nothing, Topics("bench", "fl"))
    try:
        for r in rounds:
            spec = RoundSpec(
                round_id=r["round_id"],
                participants=tuple(f"p{i}" for i in range(int(r["participants"]))),
                timeout_s=86400.0,
                model_ref=r["model_ref"],
            )
            await coordinator.configure(spec, start=True)
        tls = service_tls(ca_of(args), "coordinator")
        async with serving("127.0.0.1:0", [coordinator_binding(coordinator)], tls) as port:
            write_line(sys.stdout, {"addr": f"127.0.0.1:{port}"})
            await stdin_closed()
    finally:
        await coordinator.aclose()
        if sqlite is not None:
            await sqlite.close()


# ---- registry for model transfer ------------------------------------------------------------


async def run_registry(args: Json) -> None:
    config = RegistryConfig("127.0.0.1:0", state_dir=Path(args["state_dir"]), tls=None)
    async with RegistryApp(config) as app:
        w = model_bytes(int(args["model_bytes"]))
        info = await app.registry.put_model(Payload.of({"w": w}))
        del w
        async with serving(config.addr, app.bindings, None) as port:
            write_line(
                sys.stdout,
                {"addr": f"127.0.0.1:{port}", "version": info.version, "uri": info.model_uri},
            )
            await stdin_closed()


# ---- aggregation memory -----------------------------------------------------------------------


class LazyUpdates(Sequence[R.Update]):
    """K updates of D float32 parameters, each made when asked for and not kept (as the SQLite
    store reads stored updates one at a time)."""

    def __init__(self, k: int, d: int) -> None:
        self.k = k
        self.d = d
        self.base = np.random.default_rng(1).standard_normal(d, dtype=np.float32)

    def __len__(self) -> int:
        return self.k

    @overload
    def __getitem__(self, index: int) -> R.Update: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[R.Update]: ...

    def __getitem__(self, index: int | slice) -> R.Update | Sequence[R.Update]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.k))]
        if not 0 <= index < self.k:
            raise IndexError(index)
        w = np.multiply(self.base, np.float32(1.0 + index * 1e-4))
        return R.Update(f"p{index}", "fl/models/global_model_v0", 1 + index % 7, {}, {"w": w})


async def run_aggmem(args: Json) -> None:
    k, d = int(args["k"]), int(args["d"])
    updates = LazyUpdates(k, d)
    # A server optimiser (e.g. fedadam) also streams the base model and answers a state.
    strategy = str(args.get("strategy", ""))
    base = {"w": np.zeros(d, np.float32)} if strategy_class(strategy).needs_base else None
    run = StrategyRun(strategy, "", base, None)
    async with serving("127.0.0.1:0", [aggregator_binding()], None) as port:
        aggregator = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        registry = grpc.aio.insecure_channel("127.0.0.1:9", options=GRPC_OPTIONS)  # unused
        try:
            backend = GrpcModelBackend(registry, aggregator, timeout_s=3600)
            started = time.perf_counter()
            result = (await backend.aggregate("mem", updates, run)).model
            seconds = time.perf_counter() - started
        finally:
            await aggregator.close(None)
            await registry.close(None)
    write_line(
        sys.stdout,
        {
            "seconds": seconds,
            "vmhwm_kib": peak_rss_kib(),
            "result_bytes": int(sum(a.nbytes for a in result.values())),
        },
    )
    await stdin_closed()


# ---- fleet: the services one per process, and many proplets per process -------------------


async def _serve(stack: contextlib.AsyncExitStack, app: ServiceApp) -> str:
    """Start `app` and its plaintext gRPC server on a free loopback port; its address."""
    await stack.enter_async_context(app)
    port = await stack.enter_async_context(serving("127.0.0.1:0", app.bindings, None))
    return f"127.0.0.1:{port}"


def fleet_ids(args: Json) -> list[str]:
    return [f"{args['id_prefix']}{i}" for i in range(int(args["first"]), int(args["end"]))]


async def run_services(args: Json) -> None:
    async with contextlib.AsyncExitStack() as stack:
        registry = await _serve(stack, RegistryApp(RegistryConfig("127.0.0.1:0", tls=None)))
        datastore = await _serve(
            stack,
            DataStoreApp(
                DataStoreConfig("127.0.0.1:0", seed_proplet_ids=tuple(fleet_ids(args)), tls=None)
            ),
        )
        aggregator = await _serve(stack, AggregatorApp(AggregatorConfig("127.0.0.1:0", tls=None)))
        out = {"registry": registry, "datastore": datastore, "aggregator": aggregator}
        write_line(sys.stdout, {**out, "pid": os.getpid()})
        await stdin_closed()


def _mqtt(args: Json) -> MqttConfig:
    return MqttConfig(port=int(args["mqtt_port"]), topics=Topics(args["domain"], "fl"))


async def run_coordinator(args: Json) -> None:
    config = CoordinatorConfig(
        addr="127.0.0.1:0",
        aggregator_addr=args["aggregator"],
        registry_addr=args["registry"],
        datastore_addr=args["datastore"],
        mqtt=_mqtt(args),
        tier=args.get("tier", "flat"),
        upstream_addr=args.get("upstream", ""),
        site_id=args.get("site_id", ""),
        tick_s=0.05,
        rpc_timeout_s=300.0,
        tls=None,
    )
    async with contextlib.AsyncExitStack() as stack:
        addr = await _serve(stack, CoordinatorApp(config))
        write_line(sys.stdout, {"coordinator": addr, "pid": os.getpid()})
        await stdin_closed()


async def run_manager(args: Json) -> None:
    endpoints = Endpoints(
        coordinator=args["coordinator"],
        aggregator=args["aggregator"],
        registry=args["registry"],
        datastore=args["datastore"],
    )
    config = ManagerConfig(
        addr="127.0.0.1:0",
        coordinator_addr=args["coordinator"],
        mqtt=_mqtt(args),
        alive_window_s=3600.0,
        task_endpoints=endpoints,
        rpc_timeout_s=300.0,
        tls=None,
    )
    async with contextlib.AsyncExitStack() as stack:
        addr = await _serve(stack, ManagerApp(config))
        write_line(sys.stdout, {"manager": addr, "pid": os.getpid()})
        await stdin_closed()


async def run_fleet(args: Json) -> None:
    """Proplets `first..end-1` of the fleet: each its own MQTT session (client id
    proplet-ID), announcing itself and heartbeating, taking its tasks from the manager and
    submitting over gRPC; one wasmtime engine and module cache for all of them."""
    ids = fleet_ids(args)
    endpoints = Endpoints(
        coordinator=args["coordinator"],
        aggregator=args["aggregator"],
        registry=args["registry"],
        datastore=args["datastore"],
    )
    runtime = WasmRuntime.shared()
    mqtt = _mqtt(args)
    work_dir = Path(args["work_dir"])
    async with contextlib.AsyncExitStack() as stack:
        configs = [
            PropletConfig(
                proplet_id=pid,
                name=pid,
                mqtt=mqtt,
                endpoints=endpoints,
                heartbeat_s=float(args.get("heartbeat_s", 10.0)),
                work_dir=work_dir,
                task_timeout_s=600.0,
                rpc_timeout_s=300.0,
                tls=None,
            )
            for pid in ids
        ]
        # In batches: thousands of CONNECTs at once only queue at the broker. A proplet whose
        # broker connection took longer than its 10 s (a loaded machine, thousands of
        # sessions: it happened at 10,000) is started again, as a device would be, 6 times.
        pending = configs
        for _ in range(6):
            late: list[PropletConfig] = []
            for batch in range(0, len(pending), 50):
                part = pending[batch : batch + 50]
                started = await asyncio.gather(
                    *(Proplet(c, runtime=runtime).__aenter__() for c in part),
                    return_exceptions=True,
                )
                for config, proplet in zip(part, started, strict=True):
                    if isinstance(proplet, Unavailable):
                        late.append(config)
                    elif isinstance(proplet, BaseException):
                        raise proplet
                    else:
                        stack.push_async_callback(proplet.stop)
            pending = late
            if not pending:
                break
        if pending:
            raise Unavailable(f"{len(pending)} proplets not connected to the broker, 6 tries each")
        write_line(sys.stdout, {"proplets": len(ids), "pid": os.getpid()})
        await stdin_closed()


KINDS = {
    "stack": run_stack,
    "bare": run_bare,
    "ingest": run_ingest,
    "registry": run_registry,
    "aggmem": run_aggmem,
    "services": run_services,
    "coordinator": run_coordinator,
    "manager": run_manager,
    "fleet": run_fleet,
}


def main(argv: list[str]) -> int:
    import json

    kind, raw = argv[0], argv[1] if len(argv) > 1 else "{}"
    logging.basicConfig(
        level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(KINDS[kind](json.loads(raw)))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    write_line(sys.stdout, {"vmhwm_kib": peak_rss_kib(), "cpu_s": usage.ru_utime + usage.ru_stime})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
