"""The question text in BLINK's wording, so that training prompts read like the benchmark's."""

from __future__ import annotations

from ..data.schema import letter


def with_choices(question: str, choices: list[str]) -> str:
    """BLINK's prompt: question, 'Select from the following choices.', then '(A) ...' lines."""
    return question + "\nSelect from the following choices.\n" + "\n".join(
        f"({letter(i)}) {c}" for i, c in enumerate(choices))
