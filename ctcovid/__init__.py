"""ctcovid: COVID-19 detection in chest CT, DICOM in, DICOM Structured Report out."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
