"""Test-only fault injection for opsd processes started by the tests (see ``kill_after_checkpoint`` in
``tests/faults/__init__.py``): Python imports this file at start-up when its folder is on ``PYTHONPATH``.

With ``OPSD_TEST_KILL_AFTER_CHECKPOINT=N`` every training process SIGKILLs itself right after writing the
checkpoint of step N: a real crash at a known point (no cleanup code runs), with no timer to race and no
hook in opsd itself. With ``OPSD_TEST_KILL_ONCE_MARKER=PATH`` as well, only the process that creates PATH
(atomically, just before dying) is killed: the next attempt at the same training runs through.

The trainer is patched when a process imports it, so the other processes that inherit the environment
(``dvc``, the evaluation and registry stages) start as fast as ever.
"""

import os

_STEP = os.environ.get("OPSD_TEST_KILL_AFTER_CHECKPOINT")
_ONCE = os.environ.get("OPSD_TEST_KILL_ONCE_MARKER")
_TRAINER = "opsd_core.algorithm.trainer"

if _STEP:
    import importlib.abc
    import importlib.util
    import signal
    import sys

    def _dies_now() -> bool:
        if not _ONCE:
            return True
        try:
            os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False  # an earlier process took this crash
        return True

    def _patch(trainer_cls):  # type: ignore[no-untyped-def]
        save = trainer_cls.save_checkpoint

        def _save_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            path = save(self, *args, **kwargs)
            if self.state.step == int(_STEP) and _dies_now():
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        trainer_cls.save_checkpoint = _save_then_die

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
            if name != _TRAINER:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_patch(module):  # type: ignore[no-untyped-def]
                exec_module(module)
                _patch(module.OPSDTrainer)

            spec.loader.exec_module = exec_then_patch  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, _PatchOnImport())
