"""How long a 1P1D request takes to reach the prefill engine: the router starting the prefill while the
decode instance reserves (`--prefill-while-reserving`, the default) against starting it once the decode
instance has accepted, alternated in one script.

    python -m bench.dispatch --model /tmp/small --rounds 2 --probes 10

Each variant is served fresh (a 1P1D deployment, step tracing on) once per round, in alternating order.
Probes go one at a time through one HTTP connection pool, as a load generator's do: `idle` probes find
both instances idle; `busy` probes are sent while a background request decodes (so the decode instance
is mid-step when the reservation arrives). Each probe's prompt length is unique, which finds its prefill
step in the prefill instance's trace, and so is its token (no prefix-cache hits). Per probe:

    dispatch   client send -> start of the prefill step that takes the prompt (time.time(), one host)
    ttft       client send -> first streamed token

Output: the medians per variant and kind, and on/off ratios; `--out FILE` writes every probe.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.systems import RunningSystem, SystemSpec

VARIANTS = {"reserve-first": ("--no-prefill-while-reserving",), "while-reserving": ("--prefill-while-reserving",)}
_BACKGROUND_PROMPT, _BACKGROUND_TOKENS = 64, 60
_BACKGROUND_HEAD_START_S = 1.0  # the background request is decoding by then
_PAUSE_S = 0.3


def _send(client: httpx.Client, url: str, model: str, prompt: list[int], max_tokens: int, probe: dict) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}
    probe["send"] = time.time()
    with client.stream("POST", url, json=body, timeout=120) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and "first" not in probe:
                probe["first"] = time.time()


def probe_server(base_url: str, model: str, num_probes: int, first_length: int) -> list[dict]:
    """num_probes idle and num_probes busy probes, alternating; prompt lengths first_length, +2, ..."""
    url = f"{base_url}/v1/completions"
    probes: list[dict] = []
    with httpx.Client() as client:
        for _ in range(num_probes):
            for busy in (False, True):
                background = None
                token = 11 + len(probes)  # a prompt of its own: nothing of it is in the prefix cache
                if busy:
                    background = threading.Thread(target=_send, args=(
                        client, url, model, [token + 1000] * _BACKGROUND_PROMPT, _BACKGROUND_TOKENS, {}))
                    background.start()
                    time.sleep(_BACKGROUND_HEAD_START_S)
                probe = {"length": first_length + 2 * len(probes), "busy": busy}
                _send(client, url, model, [token] * probe["length"], 2, probe)
                probes.append(probe)
                if background is not None:
                    background.join()
                time.sleep(_PAUSE_S)
    return probes


def match_steps(probes: list[dict], steps: list[dict]) -> list[dict]:
    """Each probe with its prefill step (the first traced step at or after its send that computes a
    prompt of its length): adds dispatch_s, step_s and ttft_s."""
    for probe in probes:
        found = [s for s in steps if probe["length"] in s["prefill"] and s["t"] >= probe["send"] - 0.01]
        if not found:
            raise ValueError(f"no prefill step of {probe['length']} tokens after the probe's send in the trace")
        step = min(found, key=lambda s: s["t"])
        probe.update(dispatch_s=step["t"] - probe["send"], step_s=step["s"], ttft_s=probe["first"] - probe["send"])
    return probes


def run_variant(model: str, extra: tuple[str, ...], num_probes: int, first_length: int, work: Path) -> list[dict]:
    trace = work / "trace"
    spec = SystemSpec("pdserve-1p1d", "pdserve", model=model, mode="disaggregated",
                      extra_args=("--step-trace-dir", str(trace), *extra))
    with RunningSystem(spec, work) as base_url:
        probes = probe_server(base_url, model, num_probes, first_length)
    steps = [json.loads(line) for path in glob.glob(str(trace / "prefill-*.jsonl")) for line in open(path)]
    return match_steps(probes, steps)


def summarize(probes: list[dict]) -> dict:
    summary: dict = {}
    for variant in VARIANTS:
        for kind in ("idle", "busy"):
            rows = [p for p in probes if p["variant"] == variant and p["busy"] == (kind == "busy")]
            summary[f"{variant}/{kind}"] = {key: 1e3 * statistics.median(p[key] for p in rows)
                                            for key in ("dispatch_s", "ttft_s", "step_s")} | {"n": len(rows)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--rounds", type=int, default=2, help="each variant served this many times, alternating")
    parser.add_argument("--probes", type=int, default=10, help="idle and busy probes per variant and round")
    parser.add_argument("--out", help="write every probe and the summary here (JSON)")
    args = parser.parse_args(argv)
    probes: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-dispatch-") as tmp:
        for round_index in range(args.rounds):
            order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                work = Path(tmp) / f"{variant}-{round_index}"
                for probe in run_variant(args.model, VARIANTS[variant], args.probes, 100, work):
                    probes.append({**probe, "variant": variant, "round": round_index})
                print(f"round {round_index}: {variant} done", flush=True)
    summary = summarize(probes)
    print(f"{'variant/kind':<26} {'n':>3} {'dispatch ms':>12} {'ttft ms':>9} {'prefill step ms':>16}")
    for name, row in summary.items():
        print(f"{name:<26} {row['n']:>3} {row['dispatch_s']:>12.1f} {row['ttft_s']:>9.1f} {row['step_s']:>16.1f}")
    for kind in ("idle", "busy"):
        on, off = summary[f"while-reserving/{kind}"], summary[f"reserve-first/{kind}"]
        print(f"{kind}: median TTFT while reserving / reserve first = {on['ttft_s'] / off['ttft_s']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "probes": probes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
