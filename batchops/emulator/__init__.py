"""A local OpenAI-compatible Files/Batch/Chat API with fault injection.

`EmulatorServer` runs it on a background thread (tests), `serve` in the foreground
(`batchops emulator`), `Scenario` holds its knobs. See docs/emulator.md.
"""

from batchops.emulator.scenario import Scenario
from batchops.emulator.server import EmulatorServer, serve

__all__ = ["EmulatorServer", "Scenario", "serve"]
