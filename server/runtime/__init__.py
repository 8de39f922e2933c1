"""The composition root: where settings become a running engine, for every command.

    settings.py     Settings and the one OPTIONS table: every flag and EMO_SERVE_* variable
    memory_plan.py  the device memory plan, made from config.json before any weight is read
    open_engine.py  open_engine(settings) -> Runtime: device and dtype resolved once, the plan
                    checked, the expert store chosen, the model loaded, the engine built;
                    Runtime.close() owns the shutdown

`serve` (server/cli/serve.py, which wraps the engine in the HTTP app), `generate` and the
benchmarks all start here. Nothing below (engine, model, expert_cache) imports this package.
"""

from server.runtime.memory_plan import MemoryPlan, PlanError
from server.runtime.open_engine import Runtime, open_engine
from server.runtime.settings import ConfigError, Settings, load_settings, settings_of

__all__ = ["ConfigError", "MemoryPlan", "PlanError", "Runtime", "Settings", "load_settings", "open_engine",
           "settings_of"]
