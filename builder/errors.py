"""Every error olive-builder raises on purpose.

    BuilderError                  exit code 1 unless a subclass says otherwise
    ├── UsageError                what the user gave is wrong: an option, a setting, a name (exit 2)
    │   ├── RecipeError           a recipe file is missing, unreadable or invalid
    │   ├── PlanError             a valid recipe asks for something no build can do
    │   ├── ReferenceError_       a malformed reference or destination (REGISTRY/REPO:TAG)
    │   ├── OutputExistsError     the output folder exists (or appeared meanwhile) and --force was not given
    │   └── SigningError          a signing key cannot be read or used (wrong file, curve or passphrase)
    ├── EngineError               the container engine is unreachable or misbehaves (exit 3)
    │   └── ImageError            a builder image is missing or failed to build (exit 3)
    ├── BuildError                the build ran and failed (exit 4)
    │   ├── ModelNotFoundError    the model source does not exist or is not accessible
    │   ├── DatasetError          a finetune dataset cannot be fetched, or its rows do not fit the template
    │   ├── CheckError            Olive produced an output that is not a usable model
    │   ├── EvaluationError       the model is outside its accuracy gates (or cannot be evaluated)
    │   └── NativeCheckError      --require-native-check, but the build was checked by a CPU cross-check
    └── DistributionError         packaging, pushing or pulling OCI content failed (exit 5)
        ├── PackageError          a folder cannot be packaged (not a build's output, links, odd files)
        ├── StoreError            the local OCI store cannot be used or lacks content
        ├── RegistryError         a registry refused, failed or could not be reached (``status``: HTTP status)
        │   └── AuthError         the registry refused our credentials (or we had none)
        ├── ContentError          content does not match its digest or size (tampered or truncated)
        └── VerificationError     content is unsigned, signed by another key, or its attestations do not hold

The core raises these; only ``builder.cli`` prints them and exits. A message says what
failed and why, then (after a blank line) what to do about it.
"""

from __future__ import annotations


class BuilderError(Exception):
    """Base of every error olive-builder raises for a user to read."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, log_tail: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log_tail = log_tail or []

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n\n{self.hint}"


class UsageError(BuilderError):
    """The user's input (an option, an environment setting, a name) is wrong: exit 2."""

    exit_code = 2


class RecipeError(UsageError):
    """One or more problems in a recipe file; ``problems`` lists each as 'file:line: key: text'."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems or []

    def __str__(self) -> str:
        body = self.message
        if self.problems:
            body += "\n" + "\n".join(f"  {p}" for p in self.problems)
        return body if not self.hint else f"{body}\n\n{self.hint}"


class PlanError(UsageError):
    pass


class ReferenceError_(UsageError):  # noqa: N801 - the builtin ReferenceError means something else
    """A malformed OCI reference or push destination."""


class OutputExistsError(UsageError):
    """The output folder exists, or appeared while we built, and --force was not given."""


class EngineError(BuilderError):
    exit_code = 3


class ImageError(EngineError):
    pass


class BuildError(BuilderError):
    exit_code = 4


class ModelNotFoundError(BuildError):
    pass


class DatasetError(BuildError):
    """A finetune recipe's training dataset cannot be fetched, or its rows do not fit the template."""


class CheckError(BuildError):
    pass


class NativeCheckError(BuildError):
    """The build passed a CPU cross-check, but only a check on the target's hardware may publish it."""


class EvaluationError(BuildError):
    """The built model failed its evaluation gates; ``figures`` holds the evaluation record."""

    def __init__(self, message: str, *, hint: str | None = None, log_tail: list[str] | None = None,
                 figures: dict[str, object] | None = None):
        super().__init__(message, hint=hint, log_tail=log_tail)
        self.figures = figures or {}


class DistributionError(BuilderError):
    exit_code = 5


class StoreError(DistributionError):
    pass


class PackageError(DistributionError):
    pass


class RegistryError(DistributionError):
    """``status`` is the HTTP status the registry answered, None when it did not answer."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None,
                 log_tail: list[str] | None = None):
        super().__init__(message, hint=hint, log_tail=log_tail)
        self.status = status


class AuthError(RegistryError):
    pass


class ContentError(DistributionError):
    pass


class SigningError(UsageError):
    """A signing key cannot be read or used; the message never holds key material."""


class VerificationError(DistributionError):
    """Content is unsigned, signed by another key, or its attestations are missing or do not match."""
