"""The transformers versions autodeploy supports, checked before any of its code is called.

The embedded hybrid model and the export patches call transformers internals (mask builders, the
attention interface, the Mamba2 hub-kernel entry points) whose signatures change between minor
releases; outside the tested range the failure would be a TypeError deep inside a model. Both ends
of the range are run in CI (the newest with the whole test suite, the oldest with the demo and
the token-parity tests).
"""

from __future__ import annotations

MIN_VERSION = "5.17"  # oldest tested release
MAX_VERSION = "5.25"  # first release not yet tested (exclusive)
SUPPORTED = f">={MIN_VERSION},<{MAX_VERSION}"


class UnsupportedTransformersError(ImportError):
    """The installed transformers is outside the supported range; the message says what to install."""


def check_transformers_version(installed: str | None = None) -> str:
    """The installed transformers version; raises :class:`UnsupportedTransformersError` naming the
    supported range if it is outside it (or transformers is missing)."""
    if installed is None:
        try:
            import transformers
        except ImportError as e:
            raise UnsupportedTransformersError(
                f"transformers is not installed; install a supported release: pip install 'transformers{SUPPORTED}'"
            ) from e
        installed = transformers.__version__
    from packaging.version import Version  # a dependency of transformers

    if not Version(MIN_VERSION) <= Version(Version(installed).base_version) < Version(MAX_VERSION):
        raise UnsupportedTransformersError(
            f"transformers {installed} is not supported; autodeploy supports transformers{SUPPORTED}: "
            f"pip install 'transformers{SUPPORTED}'"
        )
    return installed
