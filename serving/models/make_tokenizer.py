"""The built-in model's tokenizer: a byte-level BPE trained on `serving.models.corpus`.

Llama-3-style special tokens and chat format, so chat requests render the way they do for real
Llama 3 models. The files are written by hand (tokenizer.json by `tokenizers`, tokenizer_config.json
from a dict) rather than by transformers' save_pretrained, so their bytes do not depend on the
installed transformers version.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"  # ends a chat turn: the eos of chat generation
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
PAD_TOKEN = "<|pad|>"
# Trained first, so they take ids 0..5.
SPECIAL_TOKENS = (BOS_TOKEN, END_OF_TEXT_TOKEN, EOT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, PAD_TOKEN)

# Llama 3's format: each message is a header with its role, a blank line, the content, <|eot_id|>;
# add_generation_prompt opens an assistant header for the model to complete.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def train_tokenizer(corpus_lines: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` tokens (special tokens included).

    Encoding with add_special_tokens=True prepends <|begin_of_text|>, as Llama 3's tokenizer does.
    Raises ValueError if the corpus has too few distinct pairs to reach vocab_size.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_lines, trainer=trainer, length=len(corpus_lines))
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus supports only {tokenizer.get_vocab_size()} tokens, not {vocab_size}: "
                         "lower vocab_size or enlarge the corpus (num_lines, num_rare_words)")
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast (and vLLM, which uses it)."""
    added_tokens_decoder = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
        for token in SPECIAL_TOKENS}
    return {
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": PAD_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
