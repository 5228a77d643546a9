"""Registers `adaptive-mamba` in lm-evaluation-harness's model registry (stdlib only).

lm-eval 0.4.x discovers models only through its own `lm_eval.models` module (no entry points),
and fills its registry when that module is first imported. This file is run at interpreter start
by `adaptive_mamba_lm_eval.pth` (written by `python -m adaptive_mamba.evaluation.lm_eval_adapter
install`): it adds an import hook that, right after `lm_eval.models` has been imported, registers
`adaptive-mamba` as a lazy target. Nothing else is imported at start, so other programs pay only
for one entry in `sys.meta_path`; the adapter (and torch) load when lm-eval asks for the model.
"""
import importlib.abc
import importlib.util
import sys

NAME = "adaptive-mamba"
TARGET = "adaptive_mamba.evaluation.lm_eval_adapter:AdaptiveMambaLM"


class RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of `lm_eval.models` so the registration follows its execution."""

    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # find the real module with the other finders, once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            from lm_eval.api.registry import model_registry

            if NAME not in model_registry:
                model_registry.register(NAME, target=TARGET)

        spec.loader.exec_module = exec_module
        return spec


if not any(type(f).__name__ == "RegisterAfterImport" for f in sys.meta_path):
    sys.meta_path.insert(0, RegisterAfterImport())
