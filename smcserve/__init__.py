"""smcserve: disaggregated LLM serving with SMC steering.

The one import root of the installed distribution. The repository keeps its top-level folders
(``engine/``, ``kvstore/``, ``smc/``, ``protos/``, ``decode/``, ``prefill/``, ``scheduler/``,
``client/``, ``loadtest/``, ``entrypoints/``); ``pyproject.toml`` maps each of them under this
package (``[tool.setuptools] package-dir``), so ``import smcserve.decode`` reads ``decode/``.
"""

__version__ = "0.1.0"
