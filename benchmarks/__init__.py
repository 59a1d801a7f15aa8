"""propeller-fl benchmarks: `python -m benchmarks [--smoke] [--only NAME]` (docs/benchmarks.md).

Each benchmark measures a subject side by side with a baseline in the same run (interleaved,
several repetitions, medians), prints its figures and appends them as JSON lines to
`benchmarks/results.jsonl`.
"""

# The benchmarks, in the order `python -m benchmarks` runs them.
BENCHMARK_NAMES = (
    "wasm",
    "aggregation",
    "ingest",
    "transfer",
    "round",
    "bigmodel",
    "quality",
    "fleet",
    "audit",
)
