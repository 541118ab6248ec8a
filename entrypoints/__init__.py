"""The ``smcserve`` command (``cli.py``) and what it launches: ``serve.py`` starts the server, ``steer.py``
runs SMC steering from the terminal. The top layer: nothing else in the repository imports it."""
