"""The tiny test model: a config-built Llama with a real byte-level BPE tokenizer and ChatML.

Used by tests and the ``smoke`` profile. Byte-deterministic: the same config gives the same files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opsd_core.config import ConfigError, TinyModelConfig

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)



def _tiny_training_text(seed: int) -> list[str]:
    """Deterministic tokenizer corpus: GSM-style problems and solutions plus the chat vocabulary."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=300, seed=1000 + seed)
    texts = [f"{row['question']}\n{row['metadata']['answer_cot']}\n#### {row['answer']}" for row in data]
    texts += [
        "system user assistant Solve the problem step by step. Put the final answer after ####.",
        "Reference solution: reason independently and reach the same final answer. \\boxed{42}",
        "0123456789 0 1 2 3 4 5 6 7 8 9 + - * / = % $ . , ; : ! ? ( ) [ ] { } < > ' \" # \\ _ ^ & | ~ @",
    ]
    return texts


def _train_tiny_tokenizer(cfg: TinyModelConfig) -> PreTrainedTokenizerFast:
    tok = Tokenizer(BPE())
    # Single-digit tokens keep numbers compositional (as in SmolLM2 and Llama tokenizers).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab,
        min_frequency=2,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],  # ids 0, 1, 2 as in SmolLM2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_training_text(cfg.seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
        model_max_length=8192,
    )


def build_tiny_model_dir(cfg: TinyModelConfig, out_dir: Path) -> Path:
    """Write a deterministic tiny Llama (weights from ``cfg.seed``) and its trained tokenizer."""
    if cfg.hidden % cfg.heads:
        raise ConfigError(
            f"model.tiny.hidden ({cfg.hidden}) must be a multiple of model.tiny.heads ({cfg.heads})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tiny_tokenizer(cfg)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # never larger: a random model would sample ids the tokenizer lacks
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=8192,
        tie_word_embeddings=True,  # like SmolLM2, so tied-weight paths are exercised by tests
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[IM_END],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[IM_START], eos_token_id=ids[IM_END], pad_token_id=ids[IM_END]
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


