"""manager service: proplets, tasks and experiments."""

from server.manager.app import ManagerApp, ManagerConfig, main

__all__ = ["ManagerApp", "ManagerConfig", "main"]
