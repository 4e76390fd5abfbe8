"""What a run does before its first step: work deferred past it stays deferred."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
import dlkit, dlkit.cli
assert not [m for m in sys.modules if m.startswith("orbax")], "imported by `import dlkit`"
from conftest import tiny_digits_config
cfg = tiny_digits_config(**{"train.steps": 12, "checkpoint.every_steps": 0})
rows = []
class Watch(dlkit.Callback):
    def on_row(self, run, row):
        rows.append((row["step"], any(m.startswith("orbax") for m in sys.modules)))
dlkit.fit(cfg, sys.argv[1], callbacks=[Watch()])
assert [step for step, _ in rows] == [4, 6, 8, 12] and not any(l for _, l in rows), rows
assert "orbax.checkpoint" in sys.modules  # the save at the end imported it
"""


def test_orbax_is_imported_at_the_first_save_not_with_dlkit(tmp_path):
    # Importing Orbax is a large share of a short run's start-up (docs/performance.md), and a
    # run needs it only to save or restore (`dlkit.checkpoint.store.orbax`).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
