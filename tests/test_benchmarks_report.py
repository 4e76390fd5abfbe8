"""`python -m benchmarks.run` rewrites BENCHMARKS.md: its own sections, and no others."""

from benchmarks.run import _kept_sections


def test_a_rerun_replaces_its_own_sections_and_keeps_the_others(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        "# Benchmarks\n\nold header\n\n## MLP\n\nold mlp table\n\n"
        "## Start-up\n\nstart-up figures\n\n## CNN\n\nold cnn\n\n## Own data\n\nrows\n"
    )
    written = "# Benchmarks\n\nnew header\n\n## MLP\n\nnew mlp table\n\n## CNN\n\nnew cnn"
    kept = _kept_sections(path, written)
    assert kept == ["", "## Start-up", "", "start-up figures", "", "## Own data", "", "rows"]
    assert _kept_sections(tmp_path / "missing.md", written) == []
