"""The report's typed error."""

from autopar.errors import AutoparError


class ReportError(AutoparError):
    """A plan file, measurement or option the report cannot use; the message names the field."""
