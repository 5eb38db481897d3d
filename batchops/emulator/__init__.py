"""A local OpenAI-compatible Files/Batch/Chat API with fault injection (see docs/emulator.md).

from batchops.emulator import EmulatorServer, Scenario
with EmulatorServer(scenario=Scenario(in_progress_seconds=0.2)) as emu:
    client = openai.OpenAI(base_url=emu.base_url, api_key="sk-test")
"""

from batchops.emulator.scenario import Scenario
from batchops.emulator.server import EmulatorServer, serve

__all__ = ["EmulatorServer", "Scenario", "serve"]
