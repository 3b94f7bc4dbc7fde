"""`vadsearch` with fault windows widened, for kill tests: run as `python fault_worker.py worker ...`.

VADSEARCH_FAULT_DIR names a directory; while a window is open a marker file sits there, so a test can
kill the process exactly inside it:
- `save`: a checkpoint is half written (the rest follows after VADSEARCH_FAULT_SAVE_S seconds);
- `finish`: a trial's results are stored but its COMPLETE state is not (VADSEARCH_FAULT_FINISH_S).
"""

import io
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

FAULT_DIR = Path(os.environ["VADSEARCH_FAULT_DIR"])
SAVE_S = float(os.environ.get("VADSEARCH_FAULT_SAVE_S", "0.3"))
FINISH_S = float(os.environ.get("VADSEARCH_FAULT_FINISH_S", "0.5"))


@contextmanager
def window(name: str):
    marker = FAULT_DIR / f"{name}-{os.getpid()}"
    marker.touch()
    try:
        yield
    finally:
        marker.unlink()


real_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with window("save"):
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(SAVE_S)
        f.write(data[len(data) // 2 :])


real_set_state = optuna.storages.RDBStorage.set_trial_state_values


def slow_finish(self, trial_id, state, *args, **kwargs):
    if state == TrialState.COMPLETE:
        with window("finish"):
            time.sleep(FINISH_S)
    return real_set_state(self, trial_id, state, *args, **kwargs)


# Patched before vadsearch is imported: its reconnecting storage wraps these methods at import time.
torch.save = slow_save
optuna.storages.RDBStorage.set_trial_state_values = slow_finish

from vadsearch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "vadsearch"
    main()
