"""bench/validate_simulator.py end to end on the tiny model: a real colocated server measured at two
rates, its engine's step trace fitted per left-out rate, each rate simulated with the profile and with
the in-place fit, side by side."""
import json

import pytest

pytestmark = pytest.mark.slow


def test_validation_serves_traces_and_compares_both_fits(tiny_model_dir, tmp_path):
    from bench.profile import main as profile_main
    from bench.validate_simulator import main as validate_main

    profile = tmp_path / "lat.json"
    assert profile_main(["--model", tiny_model_dir, "--quick", "--out", str(profile)]) == 0
    out = tmp_path / "validation"
    # 24 prompts a rate: each rate's in-place fit needs 8 prefill steps of the other rate, and at 8 req/s
    # on a loaded box 12 prompts were once batched into 7
    code = validate_main(["--model", tiny_model_dir, "--systems", "colocated", "--max-model-len", "512",
                          "--latency-model", f"colocated={profile}", "--result-dir", str(out),
                          "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "8",
                          "--num-prompts", "24", "--request-rate", "4,8", "--goodput", "ttft:2000", "tpot:500",
                          "--seed", "0", "--disable-tqdm"])
    assert code == 0
    system = out / "colocated"
    assert list((system / "trace").glob("colocated-*.jsonl"))  # the served engine traced its steps
    validation = json.loads((system / "validation.json").read_text())
    assert sorted(float(rate) for rate in validation["rows"]) == [4.0, 8.0]
    for row in validation["rows"].values():
        assert {"measured", "profile", "in_place"} <= row.keys()
        assert all(row[key]["slo_attainment"] is not None for key in ("measured", "profile", "in_place"))
    # each rate's in-place model was fitted on the other rate's steps only
    fitted = sorted(system.glob("latency-in-place-without-*.json"))
    assert len(fitted) == 2
    assert all(json.loads(p.read_text())["meta"]["left_out"] in p.name for p in fitted)
    assert (system / "validation-attainment.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "simulated (in place)" in summary and "| colocated | 4 |" in summary and "| colocated | 8 |" in summary
    # the same measurements simulated again, serving nothing: the simulation is deterministic, so the
    # rows come back the same; without a measured run there is nothing to resimulate
    before = validation["rows"]
    (system / "validation.json").unlink()
    assert validate_main(["--model", tiny_model_dir, "--systems", "colocated", "--max-model-len", "512",
                          "--latency-model", f"colocated={profile}", "--result-dir", str(out), "--resimulate",
                          "--goodput", "ttft:2000", "tpot:500", "--disable-tqdm"]) == 0
    assert json.loads((system / "validation.json").read_text())["rows"] == before
    with pytest.raises(RuntimeError, match="--resimulate needs"):
        validate_main(["--model", tiny_model_dir, "--systems", "colocated", "--result-dir", str(tmp_path / "none"),
                       "--resimulate"])
