"""The ``ember`` command: one module per group of commands, all thin layers over
the library."""
