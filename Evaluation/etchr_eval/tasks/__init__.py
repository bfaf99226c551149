"""Task registry: importing this package registers every built-in task."""

from . import dl3dv  # noqa: F401  (registers "dl3dv")
from .base import TASKS, DataError, Item, ItemError, Task, decode_image, get_task, register

__all__ = ["TASKS", "DataError", "Item", "ItemError", "Task", "decode_image", "get_task", "register"]
