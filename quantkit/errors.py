"""The errors users see. The CLI prints their message in one line and exits 1; no traceback."""


class QuantkitError(Exception):
    """Base of every error that is the user's to fix (bad input, missing files, environment)."""


class InputError(QuantkitError):
    """A model folder, calibration set, recipe or option that cannot be used as given."""


class HubError(QuantkitError):
    """The Hub (or the endpoint in HF_ENDPOINT) refused or could not serve a request."""


class DependencyError(QuantkitError):
    """An optional dependency (vllm, autoawq, a GPU) that this command needs is missing."""


class VerifyError(QuantkitError):
    """A release failed verification; the report names each failed check."""
