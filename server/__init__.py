"""propeller-fl services: manager, coordinator, aggregator, model registry, data store."""
