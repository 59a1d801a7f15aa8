"""datastore service."""
