"""manager service."""
