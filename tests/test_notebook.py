"""The quick-start notebook runs top to bottom."""

from __future__ import annotations

import nbclient
import nbformat
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    """Execute every cell in a fresh kernel; the last cell checks extraction equals the DDNN."""
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    last = "".join(o.get("text", "") for o in notebook.cells[-1].outputs)
    assert "standalone == DDNN at depth [1,1,1]: True" in last
    table = "".join(o.get("text", "") for o in notebook.cells[-5].outputs)
    assert "| resnet8 | [1,1,1] |" in table
    assert (tmp_path / "front.png").is_file()
