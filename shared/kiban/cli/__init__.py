"""The ``kiban`` command line."""
