#!/usr/bin/env python
"""Write the label-set tasks of the patching view (lenses/datasets/tasks/*.jsonl), written for this
project. Each line: {"prompt", "labels", "answer"}; every prompt holds two solved examples of its task
(so the format is set by the context, not by an instruction) and ends where the label comes.

    python scripts/make_tasks.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lenses" / "datasets" / "tasks"

POSITIVE = ["The soup was warm and full of flavour.", "Our guide was friendly and knew every street.",
            "The film made me laugh from start to finish.", "Fast delivery and the shoes fit perfectly.",
            "The hotel room was clean, bright and quiet.", "A wonderful book that I could not put down.",
            "The staff went out of their way to help us.", "Great value, and the battery lasts for days.",
            "The concert was the best night of my year.", "Lovely garden, and the coffee was excellent.",
            "The course was clear and the teacher patient.", "This blender is powerful and easy to clean.",
            "Beautiful views from every window of the cabin.", "The bread was fresh and the service quick.",
            "I would happily stay at this inn again.", "The game is clever, fun and looks gorgeous.",
            "My new chair is comfortable and well made.", "The museum tour was fascinating for the kids.",
            "Fantastic pizza with a perfect crispy crust.", "The app is simple and it never crashes."]
NEGATIVE = ["The soup was cold and had no taste at all.", "Our guide was late and could not answer questions.",
            "The film was dull and far too long.", "The shoes arrived broken and a size too small.",
            "The hotel room was dirty and very noisy.", "A boring book that I gave up on halfway.",
            "The staff ignored us for the whole evening.", "Poor value, and the battery dies in an hour.",
            "The concert started late and the sound was awful.", "The garden was a mess and the coffee bitter.",
            "The course was confusing and the teacher rude.", "This blender leaks and is hard to clean.",
            "The cabin was damp and the windows were cracked.", "The bread was stale and the service slow.",
            "I will never stay at this inn again.", "The game is buggy, slow and ugly.",
            "My new chair wobbles and the seat already tore.", "The museum tour was crowded and dull.",
            "Soggy pizza with a burnt, bitter crust.", "The app is confusing and crashes every day."]
YES = ["Is the sun a star?", "Is water wet?", "Do fish live in water?", "Is Paris in France?",
       "Is ice colder than boiling water?", "Do birds have feathers?", "Is seven larger than three?",
       "Can people walk on two legs?", "Is the Pacific an ocean?", "Do cows eat grass?",
       "Is a square a shape with four sides?", "Is snow usually white?", "Do trees have leaves?",
       "Is Monday a day of the week?", "Is gold a metal?", "Do bees make honey?",
       "Is the moon smaller than the earth?", "Is January a month?", "Do cats have whiskers?",
       "Is English a language?"]
NO = ["Is the sun a planet?", "Is fire cold?", "Do fish live in trees?", "Is Paris in Japan?",
      "Is ice hotter than boiling water?", "Do dogs have feathers?", "Is two larger than nine?",
      "Can people breathe under water?", "Is the Sahara an ocean?", "Do cows eat rocks?",
      "Is a triangle a shape with four sides?", "Is coal usually white?", "Do rocks have leaves?",
      "Is April a day of the week?", "Is wood a metal?", "Do spiders make honey?",
      "Is the moon larger than the earth?", "Is Tuesday a month?", "Do snakes have legs?",
      "Is a banana a language?"]
CONTINENTS = {
    "Africa": ["Kenya", "Nigeria", "Egypt", "Ghana", "Ethiopia", "Morocco", "Senegal", "Uganda", "Tanzania",
               "Algeria", "Angola", "Zambia", "Mali"],
    "Europe": ["France", "Germany", "Italy", "Spain", "Poland", "Sweden", "Norway", "Greece", "Portugal",
               "Austria", "Ireland", "Hungary", "Finland"],
    "Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "Nepal", "Mongolia", "Indonesia", "Malaysia",
             "Pakistan", "Cambodia", "Laos", "Bangladesh"],
}


def few_shot(shots, query, render):
    return "".join(render(x, y) + "\n\n" for x, y in shots) + render(query, None)


def sentiment():
    items = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    shots = [("The room was spotless and the bed comfortable.", "positive"),
             ("The train was late and the seats were broken.", "negative")]
    render = lambda x, y: f"Review: {x}\nSentiment:" + (f" {y}" if y else "")  # noqa: E731
    return [dict(prompt=few_shot(shots, x, render), labels=[" positive", " negative"], answer=f" {y}")
            for x, y in items]


def yesno():
    items = [(q, "yes") for q in YES] + [(q, "no") for q in NO]
    shots = [("Is the grass green?", "yes"), ("Is a cat a bird?", "no")]
    render = lambda x, y: f"Question: {x}\nAnswer (yes or no):" + (f" {y}" if y else "")  # noqa: E731
    return [dict(prompt=few_shot(shots, x, render), labels=[" yes", " no"], answer=f" {y}") for x, y in items]


def continent():
    items = [(c, k) for k, cs in CONTINENTS.items() for c in cs]
    shots = [("Belgium", "Europe"), ("Sudan", "Africa")]
    render = lambda x, y: f"Country: {x}\nContinent:" + (f" {y}" if y else "")  # noqa: E731
    return [dict(prompt=few_shot(shots, x, render), labels=[" Africa", " Europe", " Asia"], answer=f" {y}")
            for x, y in items]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in [("sentiment", sentiment), ("yesno", yesno), ("continent", continent)]:
        rows = make()
        random.Random(0).shuffle(rows)
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path} ({len(rows)} prompts)")


if __name__ == "__main__":
    main()
