"""Proplet: the edge agent that runs WASM tasks."""
