"""Test-only fault injection for opsd processes started by the tests (see ``kill_after_checkpoint`` in
``tests/faults/__init__.py``): Python imports this file at start-up when its folder is on ``PYTHONPATH``.

With ``OPSD_TEST_KILL_AFTER_CHECKPOINT=N`` every training process SIGKILLs itself right after writing the
checkpoint of step N: a real crash at a known point (no cleanup code runs), with no timer to race and no
hook in opsd itself. With ``OPSD_TEST_KILL_ONCE_MARKER=PATH`` as well, only the process that creates PATH
(atomically, just before dying) is killed: the next attempt at the same training runs through.

The trainer is patched when a process imports it, so the other processes that inherit the environment
(``dvc``, the evaluation and registry stages) start as fast as ever.

With ``OPSD_TEST_KILL_DVC_UNDER=DIR`` and ``OPSD_TEST_KILL_DVC_AFTER=N``, a ``dvc`` process SIGKILLs itself right
after its N-th rename of a file into DIR (DVC moves every cache or remote object into place by renaming a
temporary file): a crash in the middle of a ``dvc add`` or ``dvc push``.
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


_DVC_UNDER = os.environ.get("OPSD_TEST_KILL_DVC_UNDER")
_DVC_AFTER = os.environ.get("OPSD_TEST_KILL_DVC_AFTER")

if _DVC_UNDER and _DVC_AFTER and __import__("sys").orig_argv[1:3] == ["-m", "dvc"]:
    import signal
    import threading

    _renames = [0]
    _count_lock = threading.Lock()  # DVC transfers objects from a thread pool

    def _counting(real):  # type: ignore[no-untyped-def]
        def rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            real(src, dst, *args, **kwargs)
            if os.path.abspath(os.fsdecode(dst)).startswith(_DVC_UNDER + os.sep):
                with _count_lock:
                    _renames[0] += 1
                    if _renames[0] >= int(_DVC_AFTER):
                        os.kill(os.getpid(), signal.SIGKILL)

        return rename

    os.rename = _counting(os.rename)
    os.replace = _counting(os.replace)
