"""Scorers for the demo: word lists, not reward models, so not `genarm-vllm score`; their
scores go into the rows as that command writes them, for genarm_vllm.jobs.report.

- VADER compound score (`vadersentiment`) in [-1, 1]: labels the ARM's training pairs.
- AFINN (`afinn`): an independent word list (Nielsen 2011) that played no part in making
  the training data; the score of a completion is the sum of its words' valences.
- first_person: first-person pronouns per 100 words (the second ARM's attribute).
All are offline word lists: no model download.
"""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@functools.lru_cache(maxsize=1)
def _afinn():
    from afinn import Afinn

    return Afinn(language="en")


def vader(text: str) -> float:
    """VADER compound sentiment of `text`, -1 (negative) .. 1 (positive)."""
    return float(_vader().polarity_scores(text)["compound"])


def afinn(text: str) -> float:
    """AFINN sentiment of `text`: the sum of its words' valences (-5 .. 5 each)."""
    return float(_afinn().score(text))


# The word class the second ARM learns to avoid: first-person pronouns (an impersonal style).
FIRST_PERSON = re.compile(
    r"\b(i|i'm|i've|i'd|i'll|me|my|mine|myself|we|we're|we've|we'll|we'd|our|ours|ourselves|us)\b",
    re.IGNORECASE,
)


def first_person_count(text: str) -> int:
    return len(FIRST_PERSON.findall(text))


def first_person(text: str) -> float:
    """First-person pronouns per 100 words of `text` (0 for an empty text)."""
    words = len(re.findall(r"[A-Za-z']+", text))
    return 100.0 * first_person_count(text) / words if words else 0.0


SCORERS = {"vader": vader, "afinn": afinn, "first_person": first_person}
# +1: higher is better; first-person words are what the impersonal ARM steers away from.
SIGNS = {"vader": 1.0, "afinn": 1.0, "first_person": -1.0}


def score_rows(rows: list[dict]) -> list[dict]:
    """Generated rows (a sweep's output) with every scorer's score of "generated_text" added
    to their "scores" object, the layout `genarm-vllm score` writes and jobs.report reads.
    Error rows are passed on as they are."""
    return [row if "error" in row else
            {**row, "scores": {**(row.get("scores") or {}),
                               **{name: score(row["generated_text"]) for name, score in SCORERS.items()}}}
            for row in rows]
