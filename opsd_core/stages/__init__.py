"""The pipeline's stages, one module each: ``prepare``, ``train``, ``evaluate``, ``register``.

Each takes the typed :class:`~opsd_core.config.Params` and the project root and writes its outputs
and reports; ``opsd <stage>`` and ``dvc.yaml`` call only these. Import the module you need: the
package itself imports nothing, so ``opsd status`` does not pay for torch.
"""
