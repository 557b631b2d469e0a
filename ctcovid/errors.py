"""The few exception classes of ctcovid; each message says what went wrong and where."""


class CtCovidError(Exception):
    """Base class of every error ctcovid raises on purpose."""


class InvalidInputError(CtCovidError):
    """Input data that cannot be used: not DICOM, an unusable series, a missing attribute."""


class ModelError(CtCovidError):
    """A model artifact that is missing, unreadable or inconsistent, or weights that cannot load."""


class PacsError(CtCovidError):
    """A DICOM peer that refused or could not be reached."""


class ConfigError(CtCovidError):
    """A setting with an invalid value."""


class ReportError(CtCovidError):
    """A produced DICOM object (SR, Secondary Capture) failed validation before leaving."""
