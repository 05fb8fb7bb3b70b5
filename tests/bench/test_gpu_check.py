"""bench/gpu_check.py: the one command a GPU machine runs. Its steps need a GPU; what is checked here is
the runner: it refuses a machine without one (every gpu-marked test would be skipped and pass), records
each step's status, output and seconds, stops starting steps past its budget, and fails the run when a
step failed or ran over its time."""
import sys
import tarfile

import bench.gpu_check as gpu_check
from bench.gpu_check import Step


def test_refuses_a_machine_without_a_gpu(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--only", "gpu_tests"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_records_each_step_and_fails_the_run_on_a_failed_step(tmp_path, monkeypatch):
    py = sys.executable
    fake = [Step("ok", (py, "-c", "import json, sys; print('fine'); json.dump({}, open(sys.argv[1], 'w'))",
                        str(tmp_path / "json" / "ok.json")), 30),
            Step("broken", (py, "-c", "raise SystemExit(3)"), 30),
            Step("slow", (py, "-c", "import time; time.sleep(30)"), 1)]
    monkeypatch.setattr(gpu_check, "environment", lambda py: (True, "torch x, GPU: test"))
    monkeypatch.setattr(gpu_check, "steps", lambda py, out, model: fake)
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--json-dir", str(tmp_path / "json")]) == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "GPU: test" in summary
    assert [line.split()[:2] for line in summary.splitlines()[2:]] == [["ok", "passed"], ["broken", "failed"],
                                                                        ["slow", "failed"]]
    assert "exit 3" in summary and "over 1 s" in summary
    assert "fine" in (tmp_path / "out" / "ok.txt").read_text()
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert tar.getnames() == ["ok.json"]


def test_steps_past_the_budget_are_not_run(tmp_path, monkeypatch):
    fake = [Step("first", (sys.executable, "-c", "import time; time.sleep(0.3)"), 30),
            Step("second", (sys.executable, "-c", "raise SystemExit(1)"), 30)]
    monkeypatch.setattr(gpu_check, "environment", lambda py: (True, "GPU: test"))
    monkeypatch.setattr(gpu_check, "steps", lambda py, out, model: fake)
    assert gpu_check.main(["--out", str(tmp_path), "--budget-s", "0.1"]) == 0
    summary = (tmp_path / "summary.txt").read_text()
    assert "first          passed" in summary and "second         not run (budget)" in summary
    assert not (tmp_path / "second.txt").exists()


def test_the_gpu_tests_step_names_every_file_with_gpu_marked_tests():
    files = gpu_check.gpu_test_files()
    assert "tests/serving/test_gpu_paths.py" in files and "tests/serving/test_cuda_graphs.py" in files
    assert "tests/kvcache/test_transfer_one_sided.py" in files and not any("pdkernels" in f for f in files)
    assert "tests/bench/test_gpu_check.py" not in files  # this file only talks about the marker


def test_the_real_steps_name_existing_tests_and_modules():
    for step in gpu_check.steps("python", gpu_check.Path("/tmp"), "/tmp/small"):
        assert step.timeout_s > 0
        if "pytest" in step.args:
            assert "-m" in step.args or "tests/pdkernels" in step.args
    assert [s.name for s in gpu_check.steps("python", gpu_check.Path("/tmp"), "m")][:2] == ["gpu_tests", "kernel_tests"]
