"""Task registry: importing this package registers every built-in task."""

from . import dl3dv  # noqa: F401  (registers "dl3dv")
from . import vstar, hrbench, chartqa, charxiv, viewspatial  # noqa: F401,E401  (perception, chart and 3D columns)
from . import maze, jigsaw  # noqa: F401,E401  (registers "maze", "frozenlake", "coco_jigsaw")
from .base import TASKS, DataError, Item, ItemError, Task, decode_image, get_task, register

__all__ = ["TASKS", "DataError", "Item", "ItemError", "Task", "decode_image", "get_task", "register"]
