"""kiban: batch inference and retrieval evaluation of image encoders.

This package is the common library every service container installs: settings,
messages, the object store, the vector store, model cards and the registry,
telemetry, the Celery app and the ``kiban`` command line.
"""

import os

__version__ = "0.1.0"

# ONNX Runtime writes a device id under ~/.cache and a session file in $TMPDIR as soon as it is
# imported unless this is set first; every kiban process imports this package before it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
