"""Fixtures for bench tests: a tiny tokenizer trained here, so no test downloads anything."""
from __future__ import annotations

import pytest

_WORDS = ("prefill decode token cache batch latency request server model layer block tenant goodput "
          "attainment schedule stream chunk output input the of and to in is that for on with as at by "
          "from this be are was not but all can has one more time will about than into only new").split()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (vocabulary 600) saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(24)) for i in range(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from bench.prompts import load_tokenizer

    return load_tokenizer(tokenizer_dir)
