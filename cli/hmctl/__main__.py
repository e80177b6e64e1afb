"""``python -m hmctl``: the same as the ``hmctl`` command."""

from hmctl.main import app

app(prog_name="hmctl")
