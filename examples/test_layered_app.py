"""An application image made of layer directories, stacked on the host's own /usr.

Layer 1 holds the application, layer 2 a configuration that overrides one file of layer 1:
the topmost layer wins, and neither directory is modified by what the container does.
"""

import textwrap
from pathlib import Path

from pytest_sandbox import Image, Sandbox

APP = textwrap.dedent(
    """
    import json, pathlib
    config = json.loads(pathlib.Path("/app/config.json").read_text())
    pathlib.Path("/app/state.txt").write_text("written inside")
    print(f"hello from {config['name']}")
    """
)


def test_layered_app(sandbox: Sandbox, tmp_path: Path) -> None:
    app = tmp_path / "app-layer" / "app"
    app.mkdir(parents=True)
    (app / "main.py").write_text(APP)
    (app / "config.json").write_text('{"name": "default"}')
    config = tmp_path / "config-layer" / "app"
    config.mkdir(parents=True)
    (config / "config.json").write_text('{"name": "production"}')

    image = Image.from_layers(tmp_path / "app-layer", tmp_path / "config-layer")
    result = sandbox.run(["python3", "/app/main.py"], image=image)

    assert result.stdout == b"hello from production\n"
    assert not (app / "state.txt").exists()  # the container wrote into its own upper layer
    assert (app / "config.json").read_text() == '{"name": "default"}'
