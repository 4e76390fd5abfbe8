"""`python -m benchmarks.accelerator --smoke`: the accelerator run's plumbing, on CPU."""

import json

from benchmarks import accelerator


def test_smoke_run_writes_the_json_and_the_table(tmp_path):
    assert accelerator.main(["--smoke", "--out", str(tmp_path), "--budget-s", "600"]) == 0
    report = json.loads((tmp_path / "accelerator.json").read_text())
    assert report["smoke"] is True and report["backend"] == "cpu"
    jobs = {j["job"]: j for j in report["jobs"]}
    assert list(jobs) == ["cnn", "resnet", "lm"]
    for j in jobs.values():
        assert j["steps_run"] == 4 and j["stopped_by"] == "steps"
        assert j["examples_per_s"] > 0 and j["flops_per_step"] > 0
        assert j["mfu"] is None  # no data sheet peak for a CPU: absent, not invented
        assert 0 < j["mfu_vs_measured_peak"] <= 1
        assert "eval/accuracy" in j["final_eval"]
    assert jobs["lm"]["precision"] == "bfloat16"
    assert jobs["lm"]["tokens_per_s"] == jobs["lm"]["examples_per_s"] * 32  # seq_len 32
    assert jobs["cnn"]["tokens_per_s"] is None
    table = (tmp_path / "accelerator.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[4:]] == ["cnn", "resnet", "lm"]
