"""Which errors are the user's to fix: the CLI prints them in one line, and a run never retries them.

A config, data, model or checkpoint problem fails the same way however often it is retried; its message names
the file or key and the fix. Raised inside a worker, such an error reaches the driver as Ray's RayTaskError,
which is also an instance of the original class, chained (`raise ... from`) under the group's error.
"""

from __future__ import annotations


def user_error_types() -> tuple[type[BaseException], ...]:
    from lopt_dist.config import ConfigError  # CheckpointError and CheckpointWriteError derive from it
    from lopt_dist.data.formats import DataError
    from lopt_dist.model.errors import ModelStructureError

    return ConfigError, DataError, ModelStructureError


def caused_by_user(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, is a user error."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, user_error_types()):
            return True
        seen.add(id(err))
        err = err.__cause__
    return False
