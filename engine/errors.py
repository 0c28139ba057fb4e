"""The engine's exceptions: one base class, one subclass per kind of failure.

Messages name the bad file, line or value and say what would be valid. The library never exits the
process; the CLI maps `exit_code` to the process exit status and prints the message on one line.
"""

from __future__ import annotations

# Exit codes the CLI uses. Usage errors (bad input the user can fix) differ from runtime failures.
EXIT_RUNTIME_FAILURE = 1
EXIT_USAGE_ERROR = 2


class IdiaError(Exception):
    """Base class of every error the engine raises on purpose."""

    exit_code = EXIT_RUNTIME_FAILURE


class InputError(IdiaError):
    """A user-supplied file or value is invalid (names file, templates, faces folder, labels, options)."""

    exit_code = EXIT_USAGE_ERROR


class ModelLoadError(IdiaError):
    """The model or its weights cannot be loaded (unknown name, bad checkpoint, weights not available)."""


class WeightsUnavailableError(ModelLoadError):
    """Pretrained weights were asked for but are neither cached nor downloadable (e.g. offline)."""


class DeviceError(IdiaError):
    """The requested device cannot be used (e.g. --device cuda without a CUDA GPU)."""

    exit_code = EXIT_USAGE_ERROR


class ArtifactError(IdiaError):
    """An index directory, embedding store or report on disk is missing, corrupt or incompatible."""


class ArtifactExistsError(ArtifactError):
    """An output location already holds something and the user did not ask to replace it."""

    exit_code = EXIT_USAGE_ERROR


class ManifestMismatchError(ArtifactError):
    """Two artifacts do not belong together (e.g. embeddings from another model than the index)."""


class NameDataError(IdiaError):
    """The census name lists of the `names` package are missing or unreadable (a broken install)."""


class DiskFullError(IdiaError):
    """The disk (or quota) under an output ran out of space; the message says where and how much is free."""
