"""A task that is a saved Keras model alone: the server side of a federation of training scripts.

Sites that run training scripts (`fedgrpc.client`) build and train their own model; the server
needs only the model's tensors, to start from and to average into. A saved `.keras` file
carries them, so a server of script clients needs no task file duplicating the model and no
`load_data` it never calls::

    model.save("model.keras")                  # once, from the script's model, compiled
    fl-server --task model.keras --clients 3   # the saved model is the task, and its weights the start

The file is loaded in safe mode (no code in it runs). The task's name is `saved:<file name>`
and its digest the file's SHA-256. It has no data: a `fl-client` pointed at it is told that its
sites run their own scripts. The server evaluates it only federatedly (the scripts' `evaluate=`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NoReturn

from .config import TaskRef
from .errors import TaskError
from .task import Params, Site, Task
from .task_loader import LoadedTask


def saved_model_task(path: Path) -> LoadedTask:
    """The task of the saved model at `path` (see the module docstring)."""
    if not path.is_file():
        raise TaskError(f"saved model {path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    name = f"saved:{path.name}"

    def build_model(params: Params) -> Any:
        import keras

        try:
            model = keras.models.load_model(path, compile=True, safe_mode=True)
        except Exception as exc:
            raise TaskError(f"{path} cannot be loaded as a Keras model: {exc}") from None
        if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
            raise TaskError(
                f"{path} was saved before model.compile(...): save the script's model after compiling "
                "it, so that the server knows its loss and metrics"
            )
        return model

    def load_data(site: Site) -> NoReturn:
        raise TaskError(
            f"{name} is a saved model for a federation of training scripts, not a task with data: "
            "run the site's script (fedgrpc.client), or give fl-client the task file that loads its data"
        )

    task = Task(name, build_model, load_data)
    return LoadedTask(task, TaskRef(name, digest), str(path))
