"""Student and teacher contexts, rendered with the tokenizer's own chat template.

The student sees only the problem; the teacher additionally sees the verified reference solution
between delimiters. Both end with the same generation prompt, so the completion tokens sampled
from the student context can be scored unchanged behind either prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: importing transformers costs 0.4 s that `opsd status` need not pay
    from transformers import PreTrainedTokenizerBase

ANSWER_INSTRUCTION = (
    "Solve the problem step by step. End your answer with a final line of the form '#### <number>'."
)
SOLUTION_BEGIN = "<reference_solution>"
SOLUTION_END = "</reference_solution>"
TEACHER_INSTRUCTION = (
    "A verified reference solution is given between the tags above. Do not copy it or mention it: "
    "reason independently, in your own words, and reach the same final answer."
)


def student_messages(problem: str) -> list[dict[str, str]]:
    """The student context: the problem and the answer instruction."""
    return [{"role": "user", "content": f"{problem.strip()}\n\n{ANSWER_INSTRUCTION}"}]


def teacher_messages(problem: str, solution: str, instruction: str | None = None) -> list[dict[str, str]]:
    """The teacher context: problem, delimited reference solution, the teacher's instruction
    (``opsd.teacher_instruction``; None: :data:`TEACHER_INSTRUCTION`, empty: none), then the student's."""
    instruction = TEACHER_INSTRUCTION if instruction is None else instruction.strip()
    middle = f"{instruction}\n\n" if instruction else ""
    content = (
        f"{problem.strip()}\n\n{SOLUTION_BEGIN}\n{solution.strip()}\n{SOLUTION_END}\n\n"
        f"{middle}{ANSWER_INSTRUCTION}"
    )
    return [{"role": "user", "content": content}]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], thinking: bool | None = None) -> str:
    """Render messages with the chat template, ending in the assistant generation prompt.

    ``thinking``: the template's ``enable_thinking`` switch (Qwen3), None for its default; templates
    without the switch ignore it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; OPSD needs one for both contexts"
        )
    extra = {} if thinking is None else {"enable_thinking": thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    assert isinstance(text, str)
    return text


def encode(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], thinking: bool | None = None
           ) -> list[int]:
    """Token ids of a rendered context (the template already holds any special tokens)."""
    return list(tokenizer(render(tokenizer, messages, thinking), add_special_tokens=False)["input_ids"])


def student_prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: str, thinking: bool | None = None) -> list[int]:
    return encode(tokenizer, student_messages(problem), thinking)


def teacher_prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: str, solution: str,
                       thinking: bool | None = None, instruction: str | None = None) -> list[int]:
    return encode(tokenizer, teacher_messages(problem, solution, instruction), thinking)
