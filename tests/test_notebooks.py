"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel, and is committed
clean; Ctrl-C in a notebook cell stops `fit` with a checkpoint, and running the cell again
resumes.

The kernel is `python3` (ipykernel) started with this interpreter, in a temporary directory,
with the dlkit under test first on PYTHONPATH and `DLKIT_NOTEBOOK_SMOKE=1`, which each
notebook's first cell reads to shrink its runs. The simulated 8-device flag of conftest.py is
removed: a notebook sees the plain CPU, as a user's would.
"""

import os
import pathlib
import queue
import sys
import time

import pytest

import dlkit

nbformat = pytest.importorskip("nbformat", reason="pip install '.[test]' (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="pip install '.[test]' (nbclient)")
pytest.importorskip("ipykernel", reason="pip install '.[test]' (ipykernel)")

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a smoke notebook takes well under a minute in all


def kernel_env() -> dict[str, str]:
    """The environment of a notebook kernel: this dlkit, one plain CPU device, smoke sizes."""
    env = dict(os.environ)
    root = str(pathlib.Path(dlkit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    env["DLKIT_NOTEBOOK_SMOKE"] = "1"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def _has_ipywidgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "03_checkpoints.ipynb", "04_custom_model.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's cwd
    )
    start = time.perf_counter()
    client.execute(env=kernel_env())  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "01_quickstart.ipynb":
        mimes = [m for o in outputs for m in o.get("data", {})]
        assert mimes.count("image/png") >= 2  # the curves and the predictions, inline
        if _has_ipywidgets():  # tqdm.auto's notebook bar is a widget, not text redraws
            assert "application/vnd.jupyter.widget-view+json" in mimes
    print(f"{path.name}: {seconds:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has stale outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


FIT_CELL = """
import dlkit
cfg = dlkit.load_config("digits_mlp", overrides=[
    "train.steps=1000000", "train.log_every=5", "train.eval_every=0", "train.progress=false",
    "checkpoint.every_steps=0", "model.hidden_sizes=32", "optim.warmup_steps=0",
])
result = dlkit.fit(cfg, workdir={workdir!r})
print("STOPPED", result.stopped, "AT", int(result.state.step))
"""


def _run_until(client, msg_id, wait_for: str, timeout: float) -> str:
    """Collects a cell's stream output until `wait_for` appears in it (or the cell ends)."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            text += content["text"]
            if wait_for in text:
                return text
        elif kind == "error":
            raise AssertionError(f"cell raised {content['ename']}: {content['evalue']}\n{text}")
        elif kind == "status" and content["execution_state"] == "idle":
            return text
    raise AssertionError(f"waited {timeout} s for {wait_for!r}; output so far:\n{text}")


def test_ctrl_c_in_a_notebook_cell_saves_and_rerunning_resumes(tmp_path):
    from jupyter_client import KernelManager

    workdir = tmp_path / "run"
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=kernel_env(), cwd=str(tmp_path))
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        cell = FIT_CELL.format(workdir=str(workdir))
        stopped_at = []
        for attempt in range(2):
            msg_id = client.execute(cell)
            # Interrupt once training is under way (a few logged rows past the start).
            first = _run_until(client, msg_id, "\nstep ", timeout=240)
            assert "\nstep " in first, first
            if attempt == 1:
                assert f"resuming from step {stopped_at[0]}" in first
            km.interrupt_kernel()  # what the notebook's stop button (or "i, i") does
            rest = _run_until(client, msg_id, "STOPPED", timeout=120)
            text = first + rest
            assert "stopped by SIGINT after step" in text, text
            assert "checkpoint written to" in text
            step = int(text.split("STOPPED SIGINT AT ")[1].split()[0])
            steps_on_disk = sorted(
                int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
            )
            assert steps_on_disk[-1] == step
            stopped_at.append(step)
        assert stopped_at[1] > stopped_at[0] > 0
        rows = dlkit.read_history(workdir)
        assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no duplicates
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)
    assert sys.executable  # the kernel ran this interpreter (jupyter_client maps "python")
