"""bench/dispatch.py's matching of probes to the prefill steps of a trace."""
import pytest

from bench.dispatch import match_steps, summarize


def _probe(length, send, first, busy=False, variant="while-reserving"):
    return {"length": length, "send": send, "first": first, "busy": busy, "variant": variant}


def test_each_probe_takes_the_first_step_of_its_length_after_its_send():
    steps = [{"t": 9.0, "s": 0.5, "prefill": [100]},     # an earlier prompt of the same length
             {"t": 10.02, "s": 0.2, "prefill": [100]},   # this probe's
             {"t": 10.5, "s": 0.3, "prefill": [102, 7]},  # batched with another prompt
             {"t": 11.0, "s": 0.2, "prefill": [100]}]
    probes = match_steps([_probe(100, 10.0, 10.23), _probe(102, 10.4, 10.81, busy=True)], steps)
    assert probes[0]["dispatch_s"] == pytest.approx(0.02) and probes[0]["step_s"] == 0.2
    assert probes[1]["dispatch_s"] == pytest.approx(0.1) and probes[1]["ttft_s"] == pytest.approx(0.41)


def test_a_probe_without_its_step_is_an_error():
    with pytest.raises(ValueError, match="no prefill step of 104 tokens"):
        match_steps([_probe(104, 10.0, 10.3)], [{"t": 9.0, "s": 0.1, "prefill": [104]}])


def test_summary_medians_per_variant_and_kind_in_ms():
    probes = [dict(_probe(100, 0, 0, busy=b, variant=v), dispatch_s=d, ttft_s=2 * d, step_s=0.1)
              for v in ("while-reserving", "reserve-first") for b in (False, True) for d in (0.01, 0.03, 0.05)]
    summary = summarize(probes)
    assert summary["reserve-first/busy"] == {"dispatch_s": pytest.approx(30.0), "ttft_s": pytest.approx(60.0),
                                             "step_s": pytest.approx(100.0), "n": 3}
