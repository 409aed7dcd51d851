"""autodeploy: turn a PyTorch causal LM into a fast cached inference engine, without rewriting it."""

from autodeploy import backends, custom_ops  # noqa: F401  (custom_ops registers the autodeploy:: ops)
from autodeploy.api import LLM, CompletionOutput, DeployConfig, RequestOutput
from autodeploy.export import ExportError, export_model
from autodeploy.graph_view import summarize, write_views
from autodeploy.runtime.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "DeployConfig",
    "ExportError",
    "RequestOutput",
    "SamplingParams",
    "export_model",
    "summarize",
    "write_views",
    "__version__",
]
