"""Writes labelled.jsonl: the demo's probing set (run from the repo root; seeded, so reproducible).

Every text is one template, "<phrase>, the <noun> <prep> the <noun> that is/are [not] <adj> is/are
[not] <adj>.", with four binary labels true by construction:
- subject_plural (contextual): the subject (the first noun) is plural. The other noun, the attractor
  inside the subject phrase, always has the other number, and both nouns come from one list, so the
  words alone (a bag of tokens) cannot tell: "the keys near the door" and "the door near the keys"
  hold the same tokens. Only the order, i.e. context, decides.
- main_negated (contextual): the main verb is negated. Every text has exactly one "not", either in the
  relative clause ("that is not red") or on the main verb ("is not old"); both verbs are always
  there ("is" and "are", agreeing with their nouns), so again only the order decides.
- has_number (lexical): the opening phrase holds a number, in digits or words.
- past_tense (lexical): "was/were" instead of "is/are".
At layer 0 (token embeddings, no context) the contextual labels are at chance and the lexical ones
already decodable; the heatmap shows where the context-dependent information appears.

`group` is the unordered noun pair: both orders of a pair stay on one side of the train/val/test
split. `control_type` is the subject noun's lemma (12 types): the control task (Hewitt & Liang) gives
each lemma one random label, so solving it takes finding the subject, as the real task does, and
memorising its word; no label is a function of it.
"""

import json
import random
from pathlib import Path

NOUNS = [("key", "keys"), ("door", "doors"), ("box", "boxes"), ("chair", "chairs"),
         ("window", "windows"), ("lamp", "lamps"), ("book", "books"), ("cup", "cups"),
         ("table", "tables"), ("bottle", "bottles"), ("wall", "walls"), ("coat", "coats")]
PREPS = ["near", "beside", "behind", "under"]
ADJECTIVES = ["red", "old", "clean", "broken", "small", "heavy", "new", "cold"]
WITH_NUMBER = ["In 2019", "After 3 days", "At 9 o'clock", "For two hours", "On 14 May",
               "After 45 minutes", "With five people watching", "At 6 in the morning"]
WITHOUT_NUMBER = ["Last year", "After a while", "In the morning", "For a moment", "On a sunny day",
                  "After lunch", "With people watching", "Before sunset"]


def verb(plural, past):
    return ("were" if plural else "was") if past else ("are" if plural else "is")


def sentence(phrase, subject, attractor, prep, plural, main_negated, past, adj_rel, adj_main):
    n1 = NOUNS[subject][plural]
    n2 = NOUNS[attractor][not plural]
    rel = f"{verb(not plural, past)} {'' if main_negated else 'not '}{adj_rel}"
    main = f"{verb(plural, past)} {'not ' if main_negated else ''}{adj_main}"
    return f"{phrase}, the {n1} {prep} the {n2} that {rel} {main}."


def main(n=480, seed=0):
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        subject, attractor = rng.sample(range(len(NOUNS)), 2)
        plural, negated, past, number = (rng.random() < 0.5 for _ in range(4))
        phrase = rng.choice(WITH_NUMBER if number else WITHOUT_NUMBER)
        adj_rel, adj_main = rng.sample(ADJECTIVES, 2)
        prep = rng.choice(PREPS)
        text = sentence(phrase, subject, attractor, prep, plural, negated, past, adj_rel, adj_main)
        if text in seen:
            continue
        seen.add(text)
        pair = sorted((NOUNS[subject][0], NOUNS[attractor][0]))
        rows.append({"id": len(rows), "text": text, "group": "-".join(pair),
                     "subject_plural": int(plural), "main_negated": int(negated),
                     "has_number": int(number), "past_tense": int(past),
                     "control_type": NOUNS[subject][0]})
    out = Path(__file__).with_name("labelled.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(rows)} rows, {len({r['group'] for r in rows})} groups")


if __name__ == "__main__":
    main()
