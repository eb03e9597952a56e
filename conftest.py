"""Repository-wide pytest configuration.

The plugin itself is loaded through its ``pytest11`` entry point (``vmfork``);
this file only enables ``pytester`` for the plugin's own tests.
"""

pytest_plugins = ["pytester"]
