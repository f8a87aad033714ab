"""The harness is the pytest plugin parity_harness.plugin, registered as the `pytest11`
entry point `convert_parity` (pyproject.toml); the project's own fixtures are in
parity_tests/conftest.py. An install made before the entry point existed lacks it: load
the plugin from here until then (and when autoloading is off), never twice."""
import os
from importlib.metadata import entry_points

if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") or not any(
        ep.value == "parity_harness.plugin" for ep in entry_points(group="pytest11")):
    pytest_plugins = ["parity_harness.plugin"]
pytest_plugins = [*globals().get("pytest_plugins", []), "pytester"]  # test_plugin_toy_project.py runs the plugin in it
