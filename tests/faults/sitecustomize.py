"""Test-only fault injection for opsd processes started by the tests (see ``kill_after_checkpoint`` in
``tests/conftest.py``): Python imports this file at start-up when its folder is on ``PYTHONPATH``.

With ``OPSD_TEST_KILL_AFTER_CHECKPOINT=N`` every training process SIGKILLs itself right after writing the
checkpoint of step N: a real crash at a known point (no cleanup code runs), with no timer to race and no
hook in opsd itself.
"""

import os

_STEP = os.environ.get("OPSD_TEST_KILL_AFTER_CHECKPOINT")

if _STEP:
    import signal

    from opsd_core.algorithm.trainer import OPSDTrainer

    _save = OPSDTrainer.save_checkpoint

    def _save_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        path = _save(self, *args, **kwargs)
        if self.state.step == int(_STEP):
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    OPSDTrainer.save_checkpoint = _save_then_die
