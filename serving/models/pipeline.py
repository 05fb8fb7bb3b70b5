"""Pipeline parallelism, the model side: a stage holds a contiguous range of the decoder layers (the
first stage also the embedding, the last the final norm and the LM head) and nothing else is ever
allocated for it. Like tensor parallelism, a transform of the plain model at load time:

    layers   0 1 2 3 | 4 5 6 7 | 8 9 10 11        pp = 3, 12 layers
    stage    0       | 1       | 2
             embed                 norm, lm_head

Stage s holds a contiguous range of the layers: by default vLLM's even split (L // pp each, the
remainder one more each on the stages just before the last, which also holds the LM head), or the
layers per stage given by --pp-layer-partition (vLLM's VLLM_PP_LAYER_PARTITION). The hidden state and
the residual [T, H] travel from one stage to the next (serving/runner/tensor_parallel.py runs the
stages).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kvcache.layout import parse_partition, stage_layers

_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class PipelineStage:
    index: int
    partition: tuple[int, ...]  # the layers of every stage, in order (kvcache/layout.py)

    @classmethod
    def of(cls, partition, index: int) -> PipelineStage:
        partition = tuple(partition)
        if not 0 <= index < len(partition):
            raise ValueError(f"stage {index} is not a stage of pipeline_parallel_size {len(partition)}")
        return cls(index, partition)

    @property
    def size(self) -> int:
        return len(self.partition)

    @property
    def first_layer(self) -> int:
        return stage_layers(self.partition, self.index)[0]

    @property
    def end_layer(self) -> int:
        return stage_layers(self.partition, self.index)[1]

    @property
    def num_model_layers(self) -> int:
        return sum(self.partition)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer

    def holds(self, param_name: str) -> bool:
        """Whether this stage holds the model parameter `param_name` (CausalLM's naming)."""
        match = _LAYER.match(param_name)
        if match:
            return self.first_layer <= int(match[1]) < self.end_layer
        if param_name.startswith("embed_tokens."):
            return self.is_first
        if param_name.startswith(("norm.", "lm_head.")):
            return self.is_last
        return True


class Absent(nn.Module):
    """A part of the model another pipeline stage holds: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this part of the model is held by another pipeline stage")


def prune_to_stage(model: nn.Module, stage: PipelineStage) -> None:
    """Replace what the stage does not hold with Absent (on the meta device, before anything is
    allocated). A tied LM head on a last stage that is not the first keeps its own copy (the loader
    fills it from the embedding)."""
    for i in range(len(model.layers)):
        if not stage.first_layer <= i < stage.end_layer:
            model.layers[i] = Absent()
    if not stage.is_first:
        model.embed_tokens = Absent()
    if not stage.is_last:
        model.norm = Absent()
        model.lm_head = Absent()
    model.pipeline_stage = stage


def check_pipeline_parallel(num_layers: int, pp: int) -> None:
    """ValueError with what to choose when pp cannot split the model's layers."""
    if pp > num_layers:
        raise ValueError(f"--pipeline-parallel-size {pp} cannot split this model: it has {num_layers} layers and "
                         f"every stage needs one. Sizes that can: 1 to {num_layers}")


def layer_partition(num_layers: int, pp: int, spec: str | None = None) -> tuple[int, ...]:
    """The layers of each of pp stages: --pp-layer-partition (spec), else the even split; ValueError
    saying what to change."""
    check_pipeline_parallel(num_layers, pp)
    return parse_partition(spec, num_layers, pp)
