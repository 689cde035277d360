"""edged: DICOM edge inference daemon."""

__version__ = "0.1.0"
