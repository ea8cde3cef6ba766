"""The code of a registered version's MLflow model (MLflow's "models from code"): MLflow copies this file into
the version's folder at save time and runs it at load time to get the model, instead of unpickling an object
(which MLflow warns may run arbitrary code)."""

from mlflow.models import set_model

from opsd_core.registry.pyfunc_model import OpsdModel

set_model(OpsdModel())
