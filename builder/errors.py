"""Every error olive-builder raises on purpose.

    BuilderError                  exit code 1 unless a subclass says otherwise
    ├── RecipeError               a recipe file is missing, unreadable or invalid (exit 2)
    ├── PlanError                 a valid recipe asks for something no build can do (exit 2)
    ├── EngineError               the container engine is unreachable or misbehaves (exit 3)
    │   └── ImageError            a builder image is missing or failed to build (exit 3)
    ├── BuildError                the build ran and failed (exit 4)
    │   ├── ModelNotFoundError    the model source does not exist or is not accessible
    │   └── CheckError            Olive produced an output that is not a usable model
    └── DistributionError         packaging, pushing or pulling OCI content failed (exit 5)
        ├── StoreError            the local OCI store cannot be used or lacks content
        ├── RegistryError         a registry refused, failed or could not be reached
        │   └── AuthError         the registry refused our credentials (or we had none)
        └── ContentError          content does not match its digest or size (tampered or truncated)

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


class RecipeError(BuilderError):
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


class PlanError(BuilderError):
    exit_code = 2


class EngineError(BuilderError):
    exit_code = 3


class ImageError(EngineError):
    pass


class BuildError(BuilderError):
    exit_code = 4


class ModelNotFoundError(BuildError):
    pass


class CheckError(BuildError):
    pass


class DistributionError(BuilderError):
    exit_code = 5


class StoreError(DistributionError):
    pass


class RegistryError(DistributionError):
    pass


class AuthError(RegistryError):
    pass


class ContentError(DistributionError):
    pass
