"""The `datasets` commands that do more than one call: get (to a file), put (from a file),
partition (a shipped dataset spread over proplets). Their rows are in
`server.cli.commands.COMMANDS`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from server.cli.arguments import (
    partition_ids,
)
from server.cli.client import Client
from server.cli.files import (
    dataset_file_type,
    read_dataset_file,
    write_dataset_file,
)
from server.cli.render import (
    dataset_arrays,
    dataset_json,
    fields,
    render_dataset,
    render_dataset_info,
    table,
)
from server.cli.runner import Reply, shown
from server.datastore import catalog
from server.datastore.partition import (
    dataset_of,
    label_histogram,
    partition,
)
from server.errors import InvalidArgument


async def datasets_get(c: Client, a: argparse.Namespace) -> Reply:
    output = Path(a.output) if a.output else None
    if output is not None:
        dataset_file_type(output)  # before anything is fetched
    msg = await c.get_dataset(a.proplet_id)
    if output is None:
        return Reply(dataset_json(msg), render_dataset(msg))
    features, labels = dataset_arrays(msg)
    await asyncio.to_thread(write_dataset_file, output, features, labels)
    info = {
        "proplet_id": msg.proplet_id,
        "schema": msg.schema,
        "size": int(features.shape[0]),
        "num_features": int(features.shape[1]),
        "output": str(output),
    }
    text = fields(
        [
            ("proplet", msg.proplet_id),
            ("schema", msg.schema),
            ("size", info["size"]),
            ("features", info["num_features"]),
            ("wrote", str(output)),
        ]
    )
    return Reply(info, text)


async def datasets_put(c: Client, a: argparse.Namespace) -> Reply:
    if not a.proplet_id.strip():
        raise InvalidArgument("PROPLET_ID: must not be empty")
    features, labels = await asyncio.to_thread(read_dataset_file, Path(a.file))
    info = await c.put_dataset(a.proplet_id, features, labels)
    return shown(info, render_dataset_info(info))


async def datasets_partition(c: Client, a: argparse.Namespace) -> Reply:
    """Spread a shipped dataset's train split over proplets and store each part (and the
    global test split, under its reserved id) in the data store."""
    ids = partition_ids(a)
    corpus = await asyncio.to_thread(catalog.load, a.dataset)
    alpha = None if a.iid else a.dirichlet
    parts = await asyncio.to_thread(
        partition, corpus, ids, alpha=alpha, seed=a.seed, min_samples=a.min_samples
    )
    held_out = catalog.held_out_id(corpus.name)
    rows: list[dict[str, Any]] = []
    for ds in [*parts, dataset_of(held_out, corpus, corpus.test)]:
        info = await c.put_dataset(
            ds.proplet_id,
            ds.features,
            ds.labels,
            schema=ds.schema,
            num_classes=ds.num_classes,
        )
        histogram = label_histogram(ds.labels, corpus.num_classes)
        rows.append(
            {"proplet_id": info.proplet_id, "size": info.size, "labels": histogram.tolist()}
        )
    doc = {
        "dataset": corpus.name,
        "schema": parts[0].schema,
        "num_classes": corpus.num_classes,
        "num_features": corpus.num_features,
        "partition": "iid" if alpha is None else "dirichlet",
        "alpha": alpha,
        "seed": a.seed,
        "min_samples": a.min_samples,
        "proplets": rows[:-1],
        "test": rows[-1],
    }
    how = "IID" if alpha is None else f"Dirichlet alpha={alpha:g}"
    head = fields(
        [
            (
                "dataset",
                f"{corpus.name} ({corpus.num_classes} classes, {corpus.num_features} features)",
            ),
            ("partition", f"{how}, seed {a.seed}, at least {a.min_samples} samples each"),
            ("test split", f"{held_out} ({rows[-1]['size']} samples)"),
        ]
    )
    text = table(
        ["PROPLET", "SIZE", *(str(k) for k in range(corpus.num_classes))],
        [[r["proplet_id"], r["size"], *r["labels"]] for r in rows],
    )
    return Reply(doc, head + "\n\n" + text)
