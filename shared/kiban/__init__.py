"""kiban: batch inference and retrieval evaluation of image encoders.

This package is the common library every service container installs: settings,
messages, the object store, the vector store, model cards and the registry,
telemetry, the Celery app and the ``kiban`` command line.
"""

__version__ = "0.1.0"
