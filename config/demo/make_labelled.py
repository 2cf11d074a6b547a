"""Writes labelled.jsonl: the demo's probing set (run from the repo root; seeded, so reproducible).

Each text is built from a sentence skeleton (a subject and an action) and four binary choices,
which are its labels, so their truth is known by construction and checkable from the text:
is_question (a yes/no question ending in "?"), has_negation ("not" / "never"), has_number (a
number, in digits or words) and past_tense. `group` is the skeleton: its variants never straddle
the train/val/test split, so a probe cannot pass by recognising the skeleton. `control_type` is
the trailing phrase (16 types): the control task (Hewitt & Liang) gives each phrase one random label,
so a probe solves it only by telling the phrases apart.
"""

import json
import random
from pathlib import Path

SUBJECTS = ["the farmer", "my sister", "the old doctor", "our neighbour", "the pilot", "a student",
            "the baker", "his uncle", "the teacher", "her brother", "the nurse", "a tourist",
            "the mayor", "my friend", "the painter", "the driver", "our cousin", "the singer",
            "the gardener", "a stranger"]
ACTIONS = [  # base form, third person present, past
    ("walk to the market", "walks to the market", "walked to the market"),
    ("open the window", "opens the window", "opened the window"),
    ("cook dinner", "cooks dinner", "cooked dinner"),
    ("paint the fence", "paints the fence", "painted the fence"),
    ("visit the museum", "visits the museum", "visited the museum"),
    ("write a report", "writes a report", "wrote a report"),
    ("drive to work", "drives to work", "drove to work"),
    ("sing a song", "sings a song", "sang a song"),
    ("buy fresh bread", "buys fresh bread", "bought fresh bread"),
    ("fix the bike", "fixes the bike", "fixed the bike"),
    ("plant a tree", "plants a tree", "planted a tree"),
    ("clean the kitchen", "cleans the kitchen", "cleaned the kitchen"),
]
WITH_NUMBER = ["with 3 friends", "at 9 o'clock", "for two hours", "with twelve people", "on 14 May",
               "for 45 minutes", "with five children", "at 6 in the morning"]
WITHOUT_NUMBER = ["with a friend", "in the morning", "for a while", "with some people", "on a sunny day",
                  "after lunch", "with the children", "before sunset"]


def sentence(subject, action, past, negated, question, extra):
    base, present, pasts = action
    aux = "did" if past else "does"
    if question:
        body = f"{aux.capitalize()} {subject} {'not ' if negated else ''}{base} {extra}?"
    elif negated:
        word = "never" if len(extra) % 2 else "not"
        body = f"{subject[0].upper() + subject[1:]} {aux} {word} {base} {extra}."
    else:
        body = f"{subject[0].upper() + subject[1:]} {pasts if past else present} {extra}."
    return body


def main(n=480, seed=0):
    rng = random.Random(seed)
    rows = []
    seen = set()
    while len(rows) < n:
        s, a = rng.randrange(len(SUBJECTS)), rng.randrange(len(ACTIONS))
        past, negated, question, number = (rng.random() < 0.5 for _ in range(4))
        extra = rng.choice(WITH_NUMBER if number else WITHOUT_NUMBER)
        text = sentence(SUBJECTS[s], ACTIONS[a], past, negated, question, extra)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": len(rows), "text": text, "group": f"s{s:02d}-a{a:02d}",
                     "is_question": int(question), "has_negation": int(negated),
                     "has_number": int(number), "past_tense": int(past), "control_type": extra})
    out = Path(__file__).with_name("labelled.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(rows)} rows, {len({r['group'] for r in rows})} groups")


if __name__ == "__main__":
    main()
