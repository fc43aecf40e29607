"""milliwatt: answer each agent step with the cheapest tier that answers it well.

The public API is what ``__all__`` lists; tests/test_public_api.py pins it.
"""

# Nothing here changes the host's environment: each library is kept offline where it is
# used (sdk/_offline.py). The redaction module puts its filter on the "milliwatt" logger.
from . import redaction  # noqa: F401

from .errors import (  # noqa: E402
    BackendError,
    ConfigError,
    InvalidRequestError,
    MilliwattError,
    ModelLoadError,
    NoTierAnswered,
    RemoteAuthError,
    RemoteBadRequest,
    RemoteError,
    RemoteRateLimited,
    RemoteStreamError,
    RemoteTimeout,
    RemoteUnavailable,
    RuleFileError,
)
from .client import Milliwatt  # noqa: E402
from .registry import register_tier  # noqa: E402
from .tier import Completion, ModelBackend, Tier  # noqa: E402
from .types import Attempt, Energy, Step, StepMeta, StepRecord, StepResult, TierResult  # noqa: E402

__version__ = "0.10.0"

__all__ = [
    "Milliwatt",
    "Step",
    "StepMeta",
    "StepResult",
    "StepRecord",
    "Attempt",
    "Energy",
    "TierResult",
    "Tier",
    "ModelBackend",
    "Completion",
    "register_tier",
    "MilliwattError",
    "InvalidRequestError",
    "ConfigError",
    "RuleFileError",
    "BackendError",
    "ModelLoadError",
    "RemoteError",
    "RemoteTimeout",
    "RemoteRateLimited",
    "RemoteUnavailable",
    "RemoteStreamError",
    "RemoteBadRequest",
    "RemoteAuthError",
    "NoTierAnswered",
    "__version__",
]
