"""lm-eval's model class ``opsd``: lm-eval's ``hf`` model with opsd's own decoding and one forward per sequence.

Everything that decides what the model sees stays lm-eval's (:class:`~lm_eval.models.huggingface.HFLM` is the
base class): loading (``pretrained``, ``peft``, ``dtype``), the chat template, the tokenisation of contexts
and continuations, stop strings and the text post-processing. Two things run differently:

* ``generate_until`` decodes through the project's sampler (on a CPU the decoder engine on a merged copy,
  the rollouts' path in training: ``algorithm.rollout.sample``), batched, instead of transformers ``generate``
  (greedy: top-k 1). The prompt ids are what the ``hf`` model feeds ``generate`` (its batch encoding, left
  padding stripped). Sampled draws use per-row noise seeded by (seed, task, document, repeat), so a base and
  a candidate model draw the same noise for the same sample.
* ``_loglikelihood_tokens`` (``loglikelihood`` and ``loglikelihood_rolling``) runs one forward per distinct
  context+continuation token sequence and reads every request's continuation from it: the whole-solution
  and answer-line requests of a problem are the same tokens cut in two places, so they share a forward.
  (lm-eval's own grouping shares it too but reads every request at the first one's cut: harness.py.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import nn

from opsd_core.algorithm.rollout import eos_token_ids, sample
from opsd_core.backends.base import Backend
from opsd_core.config import SamplingConfig

MODEL_NAME = "opsd"
# what a sampler factory returns: the module or engine rollout.sample draws from, and its generate options
Sampler = tuple[Any, Mapping[str, Any]]
SamplerFactory = Callable[[nn.Module], Sampler]
# generation kwargs this class honours; any other one (a repetition penalty, ...) is refused rather than ignored
_DRAW_KWARGS = frozenset({"do_sample", "temperature", "top_k", "top_p"})
LLRequest = tuple[Any, list[int], list[int]]


def portable_sampler(model: nn.Module) -> Sampler:
    """The sampler when no factory is given (``lm_eval --model opsd``): opsd's portable back-end, the engine on
    a merged copy where the architecture allows, else transformers ``generate``. ``opsd evaluate`` passes the
    trainer's own back-end instead (CPU packs, the plan's sampler)."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    backend = Backend(model, dtype, "engine" if device.type == "cpu" else "generate")
    return backend.sampling_module(), backend.generate_options


def row_seed(seed: int, task: str | None, doc_id: int | None, idx: int, repeat: int) -> int:
    """A sample's own noise seed: the same sample of the same document gets the same noise in every model's run."""
    key = f"{seed}|{task}|{doc_id}|{idx}|{repeat}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def draw_config(kwargs: Mapping[str, Any], max_gen_toks: int) -> SamplingConfig:
    """lm-eval's normalised generation kwargs (``until`` and ``max_gen_toks`` removed) as opsd sampling settings:
    greedy (top-k 1) unless ``do_sample`` with a positive temperature, as transformers decides."""
    unknown = sorted(set(kwargs) - _DRAW_KWARGS)
    if unknown:
        raise ValueError(f"lm-eval model {MODEL_NAME!r} does not implement the generation kwargs {unknown}; "
                         "evaluate this task with eval.backend: hf")
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample") or temperature <= 0:
        return SamplingConfig(max_new_tokens=max_gen_toks, temperature=1.0, top_k=1, top_p=1.0)
    return SamplingConfig(max_new_tokens=max_gen_toks, temperature=temperature,
                          top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))


@register_model(MODEL_NAME)
class OpsdLM(HFLM):
    """lm-eval's ``hf`` model (same arguments) whose generation and log-likelihoods run opsd's way.

    Extra arguments: ``seed`` (the sampled draws' noise) and ``sampler_factory`` (model → (sampler, generate
    options); default :func:`portable_sampler`), built on the first generation request only.
    """

    def __init__(self, *args: Any, seed: int = 0, sampler_factory: SamplerFactory | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self._factory = sampler_factory or portable_sampler
        self._sampler: Sampler | None = None

    def _rows(self) -> int:
        """Rows per batch: ``batch_size`` (lm-eval's ``auto`` probes memory for padded batches: 1 here)."""
        return self.batch_size if isinstance(self.batch_size, int) else 1

    # -- generation --------------------------------------------------------------------------------
    def _stop_token_ids(self, until: list[str]) -> set[int]:
        """The stop strings that are one special token (``<|im_end|>``): ended as an end of sequence, since
        the decoded text skips special tokens and would never show them. Other stop strings cut the text."""
        special = set(self.tokenizer.all_special_ids)
        ids: set[int] = set()
        for text in until:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1 and enc[0] in special:
                ids.add(enc[0])
        return ids

    def _text(self, tokens: list[int], until: list[str]) -> str:
        """A completion's text exactly as the ``hf`` model post-processes it (thinking stripped, stop strings)."""
        think = self.think_end_token
        if isinstance(think, int) and think in tokens:
            tokens = tokens[len(tokens) - tokens[::-1].index(think):]
        text = self.tok_decode(tokens)
        if isinstance(think, int):
            text = text.lstrip()
        return postprocess_generated_text(text, until, think if isinstance(think, str) else None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if self._sampler is None:
            # built outside inference mode (lm-eval's runs are inside it): the sampler's copy and its oneDNN
            # packs are ordinary tensors that the packs track by version counter
            with torch.inference_mode(False), torch.no_grad():
                self._sampler = self._factory(self.model)
        module, options = self._sampler
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        model_eos = eos_token_ids(self.model, self.tokenizer)
        out: list[str] = [""] * len(requests)
        repeats: dict[tuple[Any, ...], int] = {}
        seeds: list[int] = []
        for req in requests:  # lm-eval passes a document's k samples as k copies of one request
            key = (req.task_name, req.doc_id, req.idx)
            repeats[key] = repeats.get(key, -1) + 1
            seeds.append(row_seed(self.seed, req.task_name, req.doc_id, req.idx, repeats[key]))
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one decoding setting per batch, as the hf model groups them
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            cfg = draw_config(kwargs, max_gen_toks)
            stops = model_eos | self._stop_token_ids(until)
            # longest first, as the hf model orders them (a batch's width is set by its first prompt)
            members.sort(key=lambda i: (-len(self.tok_encode(requests[i].args[0])), requests[i].args[0]))
            for lo in range(0, len(members), self._rows()):
                batch = members[lo:lo + self._rows()]
                ids, mask = self.tok_batch_encode([requests[i].args[0] for i in batch],
                                                  left_truncate_len=self.max_length - max_gen_toks,
                                                  truncation=self.truncation)
                prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
                rollouts = sample(module, prompts, cfg, self.tokenizer.pad_token_id, stops,
                                  [seeds[i] for i in batch], self.device, options)
                for i, row, valid in zip(batch, rollouts.completion_ids, rollouts.completion_mask, strict=True):
                    out[i] = self._text(row[valid].tolist(), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    # -- log-likelihood ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[LLRequest], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy?) per (key, context ids, continuation ids), one forward per distinct
        context+continuation, right-padded batches of ``batch_size`` (longest first)."""
        by_sequence: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("empty context or continuation (lm-eval substitutes a prefix token first)")
            by_sequence.setdefault(tuple(context + continuation), []).append(i)
        sequences = sorted(by_sequence, key=lambda s: (-len(s), s))
        size = override_bs or self._rows()
        res: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for lo in range(0, len(sequences), size):
            chunk = sequences[lo:lo + size]
            # the hf model's window: the last max_length + 1 tokens, the final one only ever a target
            inputs = [list(s[-(self.max_length + 1):][:-1]) for s in chunk]
            width = max(len(x) for x in inputs)
            batch = torch.zeros((len(inputs), width), dtype=torch.long)
            for row, x in enumerate(inputs):
                batch[row, :len(x)] = torch.tensor(x, dtype=torch.long)
            logits = self._model_call(batch.to(self.device))
            for row, seq in enumerate(chunk):
                members = by_sequence[seq]
                length = len(inputs[row])
                # only the positions some request scores: the softmax over the vocabulary is the costly part
                longest = max(len(requests[i][2]) for i in members)
                logp = F.log_softmax(logits[row, length - longest:length], dim=-1, dtype=self.softmax_dtype)
                for i in members:
                    key, _, continuation = requests[i]
                    cont = torch.tensor(continuation, dtype=torch.long, device=logp.device)
                    span = logp[longest - len(continuation):]
                    picked = span.gather(1, cont[:, None]).squeeze(1)
                    res[i] = (float(picked.sum()), bool((span.argmax(dim=-1) == cont).all()))
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, res[i])
        return res
