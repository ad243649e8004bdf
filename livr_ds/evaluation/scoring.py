"""Answer parsing and scoring (records, accuracy per task, parse failures), shared by validation
during training and by evaluation.

Multiple choice: only a valid letter counts. An explicit "(X)" or "answer is X" wins, then a bare
leading letter ("A", "A.", "A)"), then an exact option text. Never "the first capital letter"
(that reads "The answer is (B)" as T). Counting: the first integer, or a number word.
"""

from __future__ import annotations

import re

NUMBER_WORDS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}


def parse_choice(text: str, choices: list[str]) -> str | None:
    """The chosen letter, or None when the text names no valid option (or several)."""
    letters = [chr(65 + i) for i in range(len(choices))]
    t = re.sub(r"[*_`]", "", text).strip()  # markdown emphasis: "**B**"
    for pattern in (r"\(([A-Z])\)", r"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\(?([A-Z])\b"):
        for m in re.finditer(pattern, t):
            if m.group(1) in letters:
                return m.group(1)
    if re.fullmatch(r"[a-zA-Z][.)]?", t) and t[0].upper() in letters:  # "b", "B.", "B)"
        return t[0].upper()
    m = re.match(r"^([A-Z])(?:[.):\s]|$)", t)
    if m and m.group(1) in letters:
        others = {x for x in re.findall(r"\b([A-Z])\b", t[1:]) if x in letters and x != m.group(1)}
        return None if others else m.group(1)  # "A or B" names no single option
    lowered = t.lower().rstrip(".")
    for letter, choice in zip(letters, choices):
        if lowered == str(choice).strip().lower():
            return letter
    return None


def parse_count(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    if m:
        return int(m.group(0))
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in NUMBER_WORDS:
            return NUMBER_WORDS[word]
    return None


def is_correct(prediction: str, answer: str, choices: list[str]) -> tuple[bool, str | None]:
    """(correct?, parsed prediction) for one sample."""
    if choices:
        parsed = parse_choice(prediction, choices)
        gold = parse_choice(answer, choices) or answer.strip("() ").upper()
        return parsed is not None and parsed == gold, parsed
    parsed = parse_count(prediction)
    gold = parse_count(answer)
    if gold is None:  # open-ended but not a number: exact match, case-insensitive
        return prediction.strip().lower() == answer.strip().lower(), prediction.strip()
    return parsed is not None and parsed == gold, None if parsed is None else str(parsed)


def score(samples, predictions: list[str]) -> list[dict]:
    """One record per sample: key, task, answer, prediction, parsed, correct."""
    out = []
    for s, pred in zip(samples, predictions):
        ok, parsed = is_correct(pred, str(s.answer), list(s.choices))
        out.append({"key": s.key, "task": s.task, "answer": str(s.answer), "prediction": pred,
                    "parsed": parsed, "correct": bool(ok)})
    return out


def accuracy_by_task(records: list[dict]) -> dict:
    """{"per_task": {task: {"accuracy": %, "n": int}}, "mean": % over tasks}."""
    per_task: dict[str, list[bool]] = {}
    for r in records:
        per_task.setdefault(r["task"], []).append(r["correct"])
    table = {t: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())}
    mean = sum(t["accuracy"] for t in table.values()) / len(table) if table else 0.0
    return {"per_task": table, "mean": mean}


def parse_failures(records: list[dict]) -> dict:
    """Predictions that named no valid option / no number, overall and per task."""
    per_task: dict[str, int] = {}
    for r in records:
        per_task.setdefault(r["task"], 0)
        if r["parsed"] is None:
            per_task[r["task"]] += 1
    return {"total": sum(per_task.values()), "per_task": per_task}
