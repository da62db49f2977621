"""Prompts for the demo: everyday subjects, neither positive nor negative by themselves.

Training and held-out prompts share the four request templates but not a single subject,
so the held-out evaluation measures how the ARM generalises to new topics.
"""

from __future__ import annotations

TEMPLATES = (
    "Write one sentence about {}.",
    "Describe {} in a few words.",
    "What do you think of {}?",
    "Tell me about {}.",
)

TRAIN_SUBJECTS = (
    "your morning commute", "a rainy afternoon", "the local bus service", "an old bicycle",
    "a long queue at the post office", "your neighbour's garden", "Monday mornings",
    "a cup of coffee", "the city at night", "a crowded train", "a job interview",
    "a broken umbrella", "the last film you watched", "a traffic jam", "a school cafeteria",
    "a hospital waiting room", "a delayed flight", "a winter evening", "a parking lot",
    "an office meeting", "a noisy restaurant", "a visit to the dentist", "a cheap hotel room",
    "a small village",
)

HELD_OUT_SUBJECTS = (
    "a tax form", "a supermarket on Saturday", "a thunderstorm", "a new phone",
    "the weather this week", "a cold cup of tea", "an empty beach in November",
    "the city library", "a shared kitchen", "a late train", "a camping trip",
    "an old laptop", "a group project", "a power cut", "a long flight", "a museum visit",
    "a football match", "a second-hand sofa", "a foggy morning", "a software update",
    "a birthday party", "a hardware store", "a dog that barks at night", "a busy airport",
    "a fast-food restaurant", "a mountain road", "an exam", "a city park", "a rented flat",
    "a cooking class", "a gym membership", "a customer service call",
)


def _expand(subjects: tuple[str, ...]) -> list[str]:
    return [template.format(subject) for subject in subjects for template in TEMPLATES]


def train_prompts() -> list[str]:
    """96 prompts the ARMs are trained on."""
    return _expand(TRAIN_SUBJECTS)


def held_out_prompts() -> list[str]:
    """128 prompts used only for evaluation (subjects never seen in training)."""
    return _expand(HELD_OUT_SUBJECTS)
