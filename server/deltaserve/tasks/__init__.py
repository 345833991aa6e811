"""Built-in synthetic tasks with exactly checkable answers (see `registry`)."""

from deltaserve.tasks.base import Example, Task
from deltaserve.tasks.registry import TASKS, get_task

__all__ = ["TASKS", "Example", "Task", "get_task"]
