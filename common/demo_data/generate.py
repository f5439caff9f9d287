#!/usr/bin/env python3
"""Generate fedtune's demo datasets: clinical triage notes and bank customer intents (classification),
and triage notes with one-line summaries (``clinical_summaries.csv``, for ``--task causal-lm``).

SEED = 20240611. The clinical file is drawn from ``random.Random(SEED)``, the bank file from
``random.Random(SEED + 1)``, the summaries from ``random.Random(SEED + 2)``, so editing one
generator leaves the other files unchanged. Running

    python common/demo_data/generate.py           # rewrites the three CSVs
    python common/demo_data/generate.py --check   # also trains a bag-of-words Naive Bayes, prints accuracy

reproduces both CSVs byte for byte (checked on CPython 3.10, 3.11 and 3.12). The data is GENERATED:
templates filled with random slot values, not real patients, customers, hospitals or branches.
Standard library only; the fedtune library never imports this script (it only reads the CSVs).

Why the data is built the way it is:
- The site columns (``hospital``, ``branch``) carry different label mixes, so a plain partition by site
  is naturally non-IID, which is what federated averaging struggles with.
- Labels share vocabulary ("pain", "since yesterday", "my account"), ~12% of rows mix cues of two
  labels (the label follows the primary cue, which comes first; bag-of-words cannot see order), and
  ~5% of labels are replaced by a random wrong one, as happens in real annotation. A bag-of-words
  baseline therefore lands well below 100%, leaving room for a fine-tuned model to show a difference.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

SEED = 20240611
AMBIGUOUS_RATE = 0.12  # rows given a secondary cue from another label
NOISE_RATE = 0.05  # rows whose label is replaced by a random other label
HERE = Path(__file__).resolve().parent

Slot = Sequence[str] | Callable[[random.Random], str]


def fill(template: str, slots: dict[str, Slot], rng: random.Random) -> str:
    """Replace each ``{name}`` left to right with a random value of that slot."""

    def one(match: re.Match[str]) -> str:
        slot = slots[match.group(1)]
        return slot(rng) if callable(slot) else rng.choice(slot)

    return re.sub(r"\{(\w+)\}", one, template)


def apply_abbreviations(text: str, table: Sequence[tuple[str, str]], rng: random.Random, p: float) -> str:
    """Shorten each match of each pattern with probability p, as a hurried writer would."""
    for pattern, short in table:
        pieces = re.split(f"({pattern})", text)
        # odd positions hold the matches; one draw per match, left to right
        text = "".join(
            (short if rng.random() < p else piece) if k % 2 else piece for k, piece in enumerate(pieces)
        )
    return text


def add_typo(text: str, rng: random.Random) -> str:
    """One keyboard slip in one word of four letters or more: swap, drop or double a letter."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif kind == 1:
        w = w[:j] + w[j + 1 :]
    else:
        w = w[:j] + w[j] + w[j:]
    words[i] = w
    return " ".join(words)


def lower_first(text: str) -> str:
    """Lower-case the first letter to continue a sentence, unless it starts with 'I' or an acronym."""
    return text if re.match(r"(I\b|I'|[A-Z]{2})", text) else text[:1].lower() + text[1:]


def fix_articles(text: str) -> str:
    """'a overdraft fee' -> 'an overdraft fee', left by slot filling ('a one-sided' stays)."""
    return re.sub(r"\b([Aa]) (?=[aeioAEIO](?!ne\b|ne-)|ATM\b)", r"\1n ", text)


def quota(n: int, weights: Sequence[int]) -> list[int]:
    """Split n into integer counts proportional to weights (largest remainder, ties by position)."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(weights)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# Clinical triage notes
# --------------------------------------------------------------------------------------------------

CLINICAL_LABELS = ["cardiology", "neurology", "gastroenterology", "pulmonology", "orthopedics"]

# hospital -> (rows, weights in CLINICAL_LABELS order). Each has a specialty it is known for.
HOSPITALS: dict[str, tuple[int, list[int]]] = {
    "Kestrel Bay General": (450, [40, 15, 15, 20, 10]),  # cardiac centre
    "Alder Valley Hospital": (400, [12, 45, 13, 12, 18]),  # stroke unit
    "Thornfield Community": (350, [10, 15, 20, 10, 45]),  # trauma and sports injuries
    "Larkspur Regional": (300, [10, 10, 38, 32, 10]),  # digestive and respiratory clinics
}


def _patient(rng: random.Random) -> str:
    age = rng.randint(18, 92)
    male = rng.random() < 0.5
    forms = [
        f"{age}yo {'M' if male else 'F'}",
        f"{age} y/o {'male' if male else 'female'}",
        f"{age}-year-old {'man' if male else 'woman'}",
        f"Pt ({age}{'M' if male else 'F'})",
        f"{'Male' if male else 'Female'}, {age},",
        f"{age}{'M' if male else 'F'}",
        "Patient",
        "Pt",
    ]
    return rng.choice(forms)


def _bp(rng: random.Random) -> str:
    systolic = rng.randint(95, 190)
    return f"{systolic}/{rng.randint(55, min(115, systolic - 30))}"


CLIN_SLOTS: dict[str, Slot] = {
    "pt": _patient,
    "dur": [
        "since yesterday", "since this morning", "for 2 days", "for 3 days", "for the past week",
        "x3 days", "x2 weeks", "for several hours", "on and off for a month", "since last night",
        "for about 10 days", "intermittently for 2 weeks", "for 4-5 days", "since the weekend",
        "for a few hours", "since Monday", "for over a month", "x1 day",
    ],
    "onset": [
        "an hour ago", "this morning", "at about 6am", "after lunch", "overnight", "30 min ago",
        "while watching TV", "during the night", "earlier today", "2 hours before arrival",
    ],
    "when": [
        "while climbing stairs", "at the grocery store", "after standing up quickly", "during a walk",
        "at work", "in the shower", "at home this morning", "while driving", "last night",
    ],
    "cp": [
        "chest pain", "chest pressure", "chest tightness", "squeezing chest discomfort",
        "heaviness in the chest", "central chest pain", "crushing chest pain",
    ],
    "rad": ["left arm", "jaw", "back", "left shoulder", "neck", "both arms"],
    "palp": [
        "palpitations", "a racing heartbeat", "a fluttering feeling in the chest", "skipped beats",
        "an irregular heartbeat", "heart pounding",
    ],
    "chx": [
        "atrial fibrillation", "coronary artery disease", "heart failure", "a prior MI",
        "a stent placed last year", "a pacemaker", "valve disease",
    ],
    "ha": [
        "severe headache", "throbbing headache", "the worst headache of their life",
        "pressure headache behind the eyes", "sudden thunderclap headache", "one-sided headache",
    ],
    "ha_feat": [
        "with sensitivity to light", "not relieved by ibuprofen", "waking them from sleep",
        "worse on bending over", "with a stiff neck", "with flashing lights beforehand",
    ],
    "weak": ["weakness", "numbness", "loss of strength", "clumsiness", "heaviness"],
    "side": ["left", "right"],
    "limb": ["the left hand", "the right hand", "both feet", "the fingers", "the left arm", "the right leg"],
    "vision": [
        "double vision", "blurred vision in one eye", "brief loss of vision in the right eye",
        "a dark curtain over part of the vision", "trouble focusing the eyes",
    ],
    "abd": [
        "abdominal pain", "epigastric pain", "lower abdominal pain", "stomach pain", "belly pain",
        "upper abdominal cramps", "diffuse abdominal pain",
    ],
    "nvom": ["1", "2", "3", "4", "several", "multiple"],
    "stool": [
        "black tarry stools", "bright red blood in the stool", "watery diarrhea several times a day",
        "no bowel movement", "pale stools and itching", "loose stools with mucus",
    ],
    "food": ["takeaway chicken", "seafood", "a buffet", "reheated rice", "street food on holiday"],
    "cough": [
        "productive cough with green sputum", "dry hacking cough", "persistent cough",
        "cough with yellow phlegm", "barking cough", "worsening cough",
    ],
    "spo2": lambda rng: f"{rng.randint(84, 93)}%",
    "joint": ["knee", "ankle", "wrist", "shoulder", "hip", "elbow", "lower back"],
    "joints": ["knees", "hands", "wrists", "ankles", "shoulders"],
    "injury": [
        "a fall on ice", "a football tackle", "a bike crash", "missing a step", "a fall from a ladder",
        "a skiing accident", "tripping on the curb",
    ],
    "sport": ["football", "basketball", "tennis", "netball", "rugby", "squash"],
    "fallwhere": [
        "down the stairs", "off a ladder", "on a wet floor", "from a bike", "on the ice", "in the garden",
    ],
    "bp": _bp,
    "bphigh": lambda rng: f"{rng.randint(185, 230)}/{rng.randint(110, 135)}",
    "nmin": ["1", "2", "3", "5", "a few"],
}

# label -> chief-complaint templates (the primary cue) and follow-up findings that point to the label.
CLIN_TEMPLATES: dict[str, list[str]] = {
    "cardiology": [
        "{pt} c/o {cp} {dur}, radiating to the {rad}.",
        "{pt} reports {palp} {dur}, worse when lying down.",
        "{pt} presents with {cp} on exertion {dur}, relieved by rest.",
        "{pt} fainted {when} without warning, brief loss of consciousness, now alert.",
        "{pt} notes swelling of both ankles {dur} and gets breathless on stairs.",
        "{pt} with known {chx} c/o {cp} {dur}, sweaty and pale on arrival.",
        "{pt} states heart is racing and feels lightheaded {dur}.",
        "{pt} wakes at night unable to breathe lying flat, now needs three pillows to sleep.",
        "{pt} sent from clinic with abnormal ECG and {cp} {dur}.",
        "{pt} describes {cp} like a weight on the chest, started {onset}.",
        "{pt} reports fatigue and leg swelling {dur}, weight up 3 kg in a week.",
        "{pt} BP very high at home ({bphigh}) with pounding headache and {cp}.",
        "{pt} on blood thinners for {chx}, reports {palp} {dur}.",
        "{pt} has {cp} that comes and goes {dur}, worse with exertion.",
    ],
    "neurology": [
        "{pt} c/o {ha} {dur}, {ha_feat}.",
        "{pt} with sudden {weak} on the {side} side, started {onset}.",
        "Family reports the patient had slurred speech and facial droop {onset}.",
        "{pt} had a witnessed seizure {when}, lasted about {nmin} minutes, now drowsy.",
        "{pt} c/o dizziness and the room spinning {dur}, worse turning the head.",
        "{pt} reports tingling and numbness in {limb} {dur}, no injury.",
        "{pt} with {vision} {dur}.",
        "{pt} brought in confused and disoriented {dur}, unable to recall recent events.",
        "{pt} with tremor in the {side} hand that is getting worse {dur}.",
        "{pt} unsteady on feet and keeps losing balance {dur}, one near fall.",
        "{pt} with hx of migraines reports a different kind of headache {dur}.",
        "{pt} had trouble finding words and {weak} in {limb} {onset}, now improving.",
        "{pt} passed out with jerking of the arms and bit tongue {when}.",
        "{pt} reports memory lapses and getting lost in familiar places {dur}.",
    ],
    "gastroenterology": [
        "{pt} c/o {abd} {dur}, with nausea and {nvom} episodes of vomiting.",
        "{pt} reports {stool} {dur}.",
        "{pt} with burning pain in the upper abdomen after meals {dur}, worse lying down.",
        "{pt} has yellowing of the eyes and dark urine {dur}.",
        "{pt} c/o cramping {abd} and bloating {dur}.",
        "{pt} with difficulty swallowing, food feels stuck {dur}.",
        "{pt} vomited blood {onset}, feels weak and lightheaded.",
        "{pt} reports pain in the right upper abdomen after fatty meals {dur}.",
        "{pt} with loss of appetite and unintended weight loss {dur}.",
        "{pt} c/o heartburn and sour taste in the mouth {dur}, antacids not helping.",
        "{pt} with hx of Crohn's reports flare with diarrhea and {abd} {dur}.",
        "{pt} states belly is swollen and tender {dur}, unable to pass gas.",
        "{pt} c/o sharp pain around the navel that moved to the lower right side {dur}.",
        "{pt} with vomiting after eating {food}, unable to keep fluids down {dur}.",
    ],
    "pulmonology": [
        "{pt} c/o shortness of breath {dur}, worse with exertion.",
        "{pt} with {cough} {dur}, now with fever.",
        "{pt} known asthmatic, wheezing and using inhaler every hour {dur}.",
        "{pt} with COPD reports more sputum and breathlessness {dur}.",
        "{pt} coughed up blood-streaked sputum {dur}.",
        "{pt} c/o sharp chest pain when breathing in, recently back from a long flight.",
        "{pt} unable to finish sentences, SpO2 {spo2} on room air.",
        "{pt} reports night sweats, cough and weight loss {dur}.",
        "{pt} with fever, chills and cough {dur}, crackles on the {side} side.",
        "{pt} smoker, c/o chest tightness and wheeze {dur}.",
        "{pt} woke up breathless and coughing {dur}, has to sit up to breathe.",
        "{pt} states can't get enough air {dur}, lips look bluish.",
        "{pt} with noisy breathing and cough after a cold {dur}.",
        "{pt} with sudden breathlessness and one-sided chest pain {onset}.",
    ],
    "orthopedics": [
        "{pt} fell {fallwhere} and c/o {joint} pain, unable to bear weight.",
        "{pt} with swelling and bruising of the {joint} after {injury}.",
        "{pt} c/o low back pain {dur}, radiating down the {side} leg.",
        "{pt} twisted the {joint} playing {sport}, heard a pop.",
        "{pt} reports stiffness and aching in the {joint} {dur}, worse in the mornings.",
        "{pt} with {joint} pain after lifting heavy boxes {dur}.",
        "{pt} unable to raise the {side} arm after a fall, shoulder painful to touch.",
        "{pt} with deformity of the {side} wrist after falling on an outstretched hand.",
        "{pt} reports neck pain and stiffness after a car accident {dur}.",
        "{pt} c/o knee locking and giving way {dur}.",
        "{pt} with hip pain after a fall at home, leg looks shortened and rotated.",
        "{pt} with hx of arthritis, swelling in both {joints} {dur}.",
        "{pt} c/o heel pain with first steps in the morning {dur}.",
        "{pt} dropped a heavy object on the foot {onset}, toe swollen and bruised.",
    ],
}

CLIN_FINDINGS: dict[str, list[str]] = {
    "cardiology": [
        "ECG ordered.", "Troponin pending.", "Irregular pulse on exam.", "Diaphoretic.",
        "Pitting edema to mid shin.", "Given aspirin on arrival.", "Murmur heard on auscultation.",
    ],
    "neurology": [
        "Pupils equal and reactive.", "Last known well {onset}.", "Drift of the {side} arm.",
        "GCS 14.", "Speech slightly slurred.", "Stroke team alerted.", "Neck supple.",
    ],
    "gastroenterology": [
        "Abdomen tender on palpation.", "Guarding in the right lower quadrant.", "Bowel sounds reduced.",
        "Looks dehydrated.", "Last meal {onset}.", "Stool sample sent.", "Mild jaundice noted.",
    ],
    "pulmonology": [
        "Diffuse wheeze on auscultation.", "Using accessory muscles.", "RR 28.", "Started on nebulizer.",
        "Chest X-ray requested.", "Reduced air entry on the {side}.", "Peak flow low.",
    ],
    "orthopedics": [
        "Distal pulses intact.", "X-ray requested.", "Splint applied.", "Tender over the joint line.",
        "Limited range of motion.", "Ice and elevation started.", "No open wound.",
    ],
}

# short cues of each label, used as the secondary complaint of an ambiguous note
CLIN_CUES: dict[str, list[str]] = {
    "cardiology": [
        "occasional palpitations", "some chest tightness", "mild ankle swelling", "a racing heart at night",
        "high BP readings at home", "feeling faint on standing", "heaviness in the chest",
    ],
    "neurology": [
        "a dull headache", "some dizziness", "tingling in the fingers", "blurred vision",
        "feeling off balance", "brief confusion", "numbness in one hand",
    ],
    "gastroenterology": [
        "some nausea", "mild heartburn", "loose stools", "poor appetite", "a bloated stomach",
        "upper abdominal discomfort", "vomiting once",
    ],
    "pulmonology": [
        "a nagging cough", "mild shortness of breath", "some wheezing", "a bit of sputum",
        "breathlessness on stairs", "a chesty cough", "chest tightness when breathing in",
    ],
    "orthopedics": [
        "sore knees", "back pain", "a stiff neck", "shoulder pain", "aching joints", "hip pain",
        "a swollen ankle",
    ],
}

# pairs that clinicians genuinely confuse get picked more often as the secondary label
CLIN_CONFUSABLE: dict[str, list[str]] = {
    "cardiology": ["pulmonology", "pulmonology", "gastroenterology", "neurology", "orthopedics"],
    "neurology": ["orthopedics", "orthopedics", "cardiology", "gastroenterology", "pulmonology"],
    "gastroenterology": ["cardiology", "cardiology", "pulmonology", "neurology", "orthopedics"],
    "pulmonology": ["cardiology", "cardiology", "gastroenterology", "orthopedics", "neurology"],
    "orthopedics": ["neurology", "neurology", "cardiology", "gastroenterology", "pulmonology"],
}

CLIN_SECONDARY_FORMS = [
    "Also c/o {cue} and {cue2}.", "Mentions {cue} and {cue2} as well.",
    "Also reports {cue} {dur}, with {cue2}.", "Some {cue} and {cue2} too.",
    "Additionally {cue}, {cue2}.", "Secondary complaint: {cue}, {cue2}.",
]

HISTORY = [
    "hypertension", "type 2 diabetes", "high cholesterol", "asthma", "COPD", "GERD", "migraines",
    "osteoarthritis", "atrial fibrillation", "hypothyroidism", "a prior stroke", "gallstones",
    "obesity", "anxiety", "sleep apnea", "kidney stones", "smoking 20 pack-years",
]
MEDS = [
    "lisinopril", "metformin", "atorvastatin", "aspirin", "omeprazole", "an albuterol inhaler",
    "ibuprofen", "levothyroxine", "warfarin", "amlodipine", "sertraline", "no regular meds",
]


def _shared_sentence(kind: int, label: str, rng: random.Random) -> str:
    """A sentence any specialty's note may carry: vitals, history, meds, pain score, logistics."""
    if kind == 0:
        temp = rng.randint(362, 394) / 10
        parts = [f"BP {_bp(rng)}", f"HR {rng.randint(52, 128)}", f"SpO2 {rng.randint(91, 100)}%",
                 f"T {temp:.1f}", f"RR {rng.randint(12, 26)}"]
        rng.shuffle(parts)
        return "Vitals: " + ", ".join(parts[: rng.randint(2, 4)]) + "."
    if kind == 1:
        hx = rng.sample(HISTORY, rng.randint(1, 2))
        return rng.choice(["History of ", "Hx of ", "PMH: ", "Known "]) + " and ".join(hx) + "."
    if kind == 2:
        return rng.choice(["Takes ", "Meds: ", "On "]) + rng.choice(MEDS) + "."
    if kind == 3:
        return f"Pain {rng.randint(2, 10)}/10."
    if kind == 4:
        return rng.choice([
            "Arrived by ambulance.", "Walked in with family.", "Referred by GP.", "NKDA.",
            "No known allergies.", "Took paracetamol with little relief.", "Anxious but cooperative.",
            "Symptoms getting worse.", "First time this has happened.", "Similar episode last year.",
        ])
    if kind == 5:
        other = rng.choice([lab for lab in CLINICAL_LABELS if lab != label])
        cue = re.sub(r"^(some|a bit of|a|mild|occasional|brief) ", "", rng.choice(CLIN_CUES[other]))
        return rng.choice(["Denies ", "No ", "Negative for "]) + cue + "."
    return rng.choice(["Please help", "Pain worse since yesterday", "Wants to be seen soon",
                       "Pain medication requested", "Unable to sleep because of it"]) + "."


CLIN_ABBREV = [
    (r"\bpatient\b", "pt"), (r"\bhistory of\b", "hx of"), (r"\bshortness of breath\b", "SOB"),
    (r"\bwith\b", "w/"), (r"\bwithout\b", "w/o"), (r"\bminutes\b", "min"), (r"\bbecause\b", "bc"),
    (r"\bleft\b", "L"), (r"\bright\b", "R"), (r"\babdominal\b", "abd"), (r"\bweeks\b", "wks"),
    (r"\bfor 2 days\b", "x2d"), (r"\bsince yesterday\b", "since yday"), (r"\band\b", "&"),
]


def clinical_note(label: str, ambiguous: bool, rng: random.Random) -> str:
    main = fill(rng.choice(CLIN_TEMPLATES[label]), CLIN_SLOTS, rng)
    extras: list[str] = []
    # distinct kinds (-1: a finding of this specialty), so a note never has two vitals lines
    kinds = rng.sample([-1, -1, -1, 0, 1, 2, 3, 4, 5, 6], rng.choices([0, 1, 2], weights=[30, 45, 25])[0])
    findings = iter(rng.sample(CLIN_FINDINGS[label], kinds.count(-1)))
    for kind in kinds:
        if kind == -1:
            extras.append(fill(next(findings), CLIN_SLOTS, rng))
        else:
            extras.append(_shared_sentence(kind, label, rng))
    if ambiguous:
        other = rng.choice(CLIN_CONFUSABLE[label])
        if rng.random() < 0.7:  # a second full complaint: as many cue words as the first
            secondary = rng.choice(["Also ", "Pt also ", "Separately pt ", "Additionally pt "])
            template = re.sub(r"^\{pt\} ", "", rng.choice(CLIN_TEMPLATES[other]))
            secondary += lower_first(fill(template, CLIN_SLOTS, rng))
            sentences = [main, secondary] + extras[:1]
        else:  # a couple of minor symptoms, and a finding, that fit the other specialty
            cue, cue2 = rng.sample(CLIN_CUES[other], 2)
            secondary = fill(rng.choice(CLIN_SECONDARY_FORMS), dict(CLIN_SLOTS, cue=[cue], cue2=[cue2]), rng)
            sentences = [main, secondary, fill(rng.choice(CLIN_FINDINGS[other]), CLIN_SLOTS, rng)]
        # either way the chief complaint stays first, as the primary cue, and the note has at most 3 sentences
    else:
        sentences = [main] + extras
        if rng.random() < 0.2:  # some nurses write vitals or history before the complaint
            rng.shuffle(sentences)
    text = fix_articles(" ".join(sentences))
    if rng.random() < 0.35:
        text = apply_abbreviations(text, CLIN_ABBREV, rng, p=0.5)
    if rng.random() < 0.12:
        text = add_typo(text, rng)
    if rng.random() < 0.08:
        text = text.lower()
    return text


# --------------------------------------------------------------------------------------------------
# Bank customer messages
# --------------------------------------------------------------------------------------------------

BANK_LABELS = [
    "card_lost", "transfer_failed", "loan_inquiry", "fraud_report", "account_closure", "fee_dispute",
]

# branch -> (rows, weights in BANK_LABELS order)
BRANCHES: dict[str, tuple[int, list[int]]] = {
    "Harborview": (500, [30, 15, 8, 22, 10, 15]),  # downtown, many visitors and travellers
    "Millbrook": (400, [10, 12, 40, 8, 15, 15]),  # rural, farm and home loans
    "Eastfield Plaza": (350, [12, 15, 13, 12, 23, 25]),  # older customers, fee-sensitive
    "Online Service Centre": (250, [8, 30, 10, 32, 8, 12]),  # app and web only
}


def _amount(rng: random.Random) -> str:
    value = rng.choice([rng.randint(5, 99), rng.randint(100, 999), rng.randint(1000, 9500)])
    cents = rng.randint(1, 99)
    return rng.choice([f"${value:,}", f"${value:,}.00", f"{value} dollars", f"${value:,}.{cents:02d}"])


BANK_SLOTS: dict[str, Slot] = {
    "card": [
        "debit card", "credit card", "card", "bank card", "Visa card", "contactless card",
        "business card", "travel card",
    ],
    "last4": lambda rng: f"{rng.randint(0, 9999):04d}",
    "acct": [
        "account", "checking account", "savings account", "joint account", "business account",
        "current account", "student account",
    ],
    "when": [
        "yesterday", "this morning", "last night", "on Friday", "two days ago", "last week",
        "over the weekend", "earlier today", "on the 14th", "on Monday",
    ],
    "whenfut": ["at the end of the month", "next week", "as soon as possible", "from the 1st", "today"],
    "place": [
        "on the bus", "at a restaurant", "at the gym", "in a taxi", "at the airport", "at the mall",
        "somewhere downtown", "at a concert", "on the train",
    ],
    "amt": _amount,
    "bigamt": ["$15,000", "$40,000", "$250,000", "$8,000", "$320,000", "$25k", "$60,000"],
    "payee": [
        "my landlord", "my daughter", "a supplier", "my other bank", "my brother abroad", "a contractor",
        "my credit union account", "a friend", "the tax office", "my son's school",
    ],
    "days": ["2", "3", "4", "5", "six", "ten"],
    "loan": [
        "mortgage", "car loan", "personal loan", "home equity loan", "student loan",
        "small business loan", "home improvement loan",
    ],
    "years": ["3", "5", "10", "15", "25", "30"],
    "merchant": [
        "an online electronics store", "a gas station", "a hotel abroad", "a streaming service",
        "a furniture shop", "an airline", "a website I've never heard of", "a betting site",
    ],
    "fee": [
        "overdraft fee", "monthly maintenance fee", "wire fee", "foreign transaction fee", "late fee",
        "ATM fee", "returned payment fee", "card replacement fee", "minimum balance fee",
    ],
    "feeamt": lambda rng: rng.choice(["$35", "$12", "$25", "$9.99", "$45", "$5", "$70", "$15"]),
    "months": ["3", "6", "12"],
    "n": ["2", "5", "10", "15", "20", "over 30"],
}

BANK_TEMPLATES: dict[str, list[str]] = {
    "card_lost": [
        "I lost my {card} {when} and need it blocked right away.",
        "Can't find my {card} anywhere, I think I left it {place}. Please freeze it.",
        "My wallet was stolen {when} with my {card} inside.",
        "How do I order a replacement for my {card}? It's lost.",
        "I need a new {card}, the old one got lost {place}.",
        "Please cancel my {card}, I dropped it {place} {when}.",
        "The ATM kept my {card} {when} and didn't give it back.",
        "My {card} went missing {when}, no strange charges yet but I want it locked.",
        "Lost my bag {place}, it had my {card} in it. What do I do?",
        "Is there a way to freeze my {card} in the app? I misplaced it.",
        "I'm traveling and my {card} got lost {place}, can you send a new one?",
        "Left my {card} ending {last4} {place} {when}, please block it.",
        "Has my lost {card} been used? I reported it missing {when}.",
        "My {card} fell out of my pocket {place}, need a replacement asap.",
        "My {card} was stolen {when}, please cancel it before someone uses it.",
        "Card lost abroad, will I be charged a fee for the replacement?",
    ],
    "transfer_failed": [
        "I sent {amt} to {payee} {when} and it never arrived.",
        "My transfer of {amt} failed but the money left my {acct}.",
        "The app says transfer pending for {days} days, {amt} to {payee}.",
        "Wire transfer to {payee} was rejected {when}, no reason given.",
        "Tried to move {amt} between my accounts and got an error.",
        "{payee} says they didn't receive the {amt} I sent {when}.",
        "My standing order didn't go out this month, so the payment to {payee} was missed.",
        "Transfer was returned as invalid account number but I checked it twice.",
        "Why was my international transfer of {amt} held {when}?",
        "Payment to {payee} bounced back after {days} days.",
        "I keep getting transaction could not be completed when I try to send {amt}.",
        "My salary transfer into my {acct} is missing.",
        "The {amt} I transferred {when} shows as debited but {payee} has nothing.",
        "Online transfer to {payee} sent {when} is stuck on processing.",
        "My loan repayment transfer failed {when}, will I be penalised?",
        "I was charged for a transfer that never went through.",
    ],
    "loan_inquiry": [
        "I'd like to know the interest rate for a {loan} of {bigamt}.",
        "What documents do I need to apply for a {loan}?",
        "Am I eligible for a {loan} if I'm self-employed?",
        "Can I increase the amount on my existing {loan}?",
        "How long does approval for a {loan} usually take?",
        "I want to refinance my {loan}, what are my options?",
        "Is it possible to pay off my {loan} early without a penalty?",
        "Could you tell me about {loan} terms? Thinking of borrowing {bigamt}.",
        "What would the monthly payment be on {bigamt} over {years} years?",
        "I applied for a {loan} {when} and haven't heard back.",
        "Do you offer fixed or variable rates on a {loan}?",
        "Could I get pre-approved for a {loan} before house hunting?",
        "My {loan} payment went up, can someone explain the new rate?",
        "Can I defer a payment on my {loan} this month? Money is tight.",
        "Is there a fee for paying off my {loan} early?",
        "If I close my savings account can I use the balance as a deposit on a {loan}?",
    ],
    "fraud_report": [
        "There are charges on my {card} I didn't make, {amt} at {merchant}.",
        "Someone used my {card} {when} at {merchant}, I still have the card with me.",
        "I got a text asking for my PIN and replied, now {amt} is missing.",
        "Unauthorized withdrawal of {amt} from my {acct} {when}.",
        "I didn't authorize the {amt} payment to {merchant}, this is fraud.",
        "Someone called pretending to be the bank and I gave them my code.",
        "My online banking password was changed {when} and I didn't do it.",
        "Multiple small charges I don't recognize on my {acct} {when}.",
        "I think my identity was stolen, someone opened a credit card in my name.",
        "Strange login alerts from another country on my {acct}.",
        "A transfer of {amt} went out of my {acct} that I never made.",
        "I was scammed by a fake seller and paid {amt} with my {card}, can I get it back?",
        "My {card} was charged {amt} by {merchant} twice and I've never shopped there.",
        "Please investigate suspicious activity on my {acct}, someone is draining it.",
        "I was charged {amt} for a purchase I never made.",
        "Someone transferred money out of my {acct} without my permission.",
    ],
    "account_closure": [
        "I want to close my {acct}.",
        "How do I close my {acct} and move the balance to another bank?",
        "Please close my {acct} {whenfut}.",
        "I'm moving abroad and need to close all my accounts.",
        "My mother passed away, how do we close her {acct}?",
        "What's the process to shut down my {acct}? I don't use it anymore.",
        "Can I close my {acct} online or do I have to come in?",
        "I'd like to close my {acct} and get a cheque for the remaining balance.",
        "Close my {acct} please, I've switched banks.",
        "We're separating and want to close our joint account.",
        "Is there a charge to close my {acct} before {months} months?",
        "I have an old {acct} I forgot about, please close it.",
        "Cancel my {acct} and the {card} linked to it.",
        "Thinking about closing my {acct}, what happens to my direct debits?",
        "After all the fees this year, please close my {acct}.",
        "Please close my {acct} and transfer the balance to {payee}.",
    ],
    "fee_dispute": [
        "I was charged a {fee} of {feeamt} and I don't think that's right.",
        "Why did I get a {fee} on my {acct} {when}?",
        "Please refund the {fee}, my balance was never below zero.",
        "You charged me a {fee} twice this month.",
        "I was told there would be no {fee} on this {acct}.",
        "A {fee} of {feeamt} appeared after my transfer failed, that's not fair.",
        "If the {fee} isn't reversed I'll close my account.",
        "The {fee} is way higher than what's on your website.",
        "I got a {fee} because my deposit was delayed by your bank.",
        "Can you waive the {fee}? It was my first time.",
        "My statement shows a {fee} I never agreed to.",
        "Disputing a {fee} of {feeamt} charged {when}.",
        "Why am I paying a {fee} on a student account?",
        "Charged {feeamt} for using my {card} abroad, nobody told me about it.",
        "Why was I charged for a card replacement I never asked for?",
        "The transfer went through but you took {feeamt} for it.",
    ],
}

BANK_CUES: dict[str, list[str]] = {
    "card_lost": [
        "my card is also missing", "I can't find my card either", "I may have lost my wallet",
        "please block my card just in case",
    ],
    "transfer_failed": [
        "a transfer of mine also failed", "my payment to my landlord didn't go through",
        "the money I sent never arrived", "a transfer is stuck as pending",
    ],
    "loan_inquiry": [
        "I also wanted to ask about a loan", "what rate would I get on a mortgage",
        "I was planning to apply for a car loan", "can I still get my loan approved",
    ],
    "fraud_report": [
        "I'm worried this might be fraud", "there's a charge I don't recognize",
        "someone may have my card details", "I got a suspicious text",
    ],
    "account_closure": [
        "I'm considering closing my account", "I might move to another bank",
        "honestly I want to close this account", "maybe I should just close it",
    ],
    "fee_dispute": [
        "there's a fee I don't understand", "I was charged an overdraft fee too",
        "I don't want to pay another fee", "the fees keep going up",
    ],
}

BANK_CONFUSABLE: dict[str, list[str]] = {
    "card_lost": ["fraud_report", "fraud_report", "account_closure", "fee_dispute", "transfer_failed"],
    "transfer_failed": ["fee_dispute", "fee_dispute", "fraud_report", "account_closure", "loan_inquiry"],
    "loan_inquiry": ["fee_dispute", "fee_dispute", "account_closure", "transfer_failed", "fraud_report"],
    "fraud_report": ["card_lost", "card_lost", "transfer_failed", "account_closure", "fee_dispute"],
    "account_closure": ["fee_dispute", "fee_dispute", "card_lost", "transfer_failed", "loan_inquiry"],
    "fee_dispute": ["account_closure", "account_closure", "transfer_failed", "loan_inquiry", "card_lost"],
}

BANK_SECONDARY_FORMS = [
    "Also, {cue}.", "On top of that {cue}.", "Not sure if related but {cue}.", "And {cue}.",
]

BANK_OPENERS = ["Hi,", "Hello,", "Good morning,", "Hey,", "Dear bank,", "Hi there,", "Hello team,", "Urgent:"]
BANK_CLOSERS = [
    "Please help.", "Thanks.", "Thank you in advance.", "Can someone call me back?", "This is urgent.",
    "Very frustrated.", "I've been a customer for {n} years.", "Please advise.", "Reply asap.",
    "Regards.", "What should I do?", "I need this sorted today.",
    # closers that borrow another intent's words, as real customers do
    "I hope there's no fee for this.", "Otherwise I'll move to another bank.", "Is my money safe?",
    "I need the money for a payment today.", "I don't want to pay any charges for this.",
    "My card and account details are in the app.",
]
BANK_CONTEXT = [
    "My account number ends in {last4}.", "I'm using the mobile app.", "I already called {when}.",
    "This is about my {acct}.", "I'm at the branch now.", "Nobody answered the phone line.",
    "I checked my statement {when}.",
]

BANK_ABBREV = [
    (r"\bplease\b", "pls"), (r"\bPlease\b", "Pls"), (r"\baccount\b", "acct"), (r"\byou\b", "u"),
    (r"\bThanks\b", "Thx"), (r"\btransfer\b", "xfer"), (r"\bbecause\b", "bc"), (r"\bdon't\b", "dont"),
    (r"\bI'm\b", "im"), (r"\bcan't\b", "cant"), (r"\bdidn't\b", "didnt"), (r"\btomorrow\b", "tmrw"),
]


def bank_message(label: str, ambiguous: bool, rng: random.Random) -> str:
    parts = [fill(rng.choice(BANK_TEMPLATES[label]), BANK_SLOTS, rng)]
    if ambiguous:
        other = rng.choice(BANK_CONFUSABLE[label])
        if rng.random() < 0.7:  # a second full request, after the main one
            second = lower_first(fill(rng.choice(BANK_TEMPLATES[other]), BANK_SLOTS, rng))
            parts.append(rng.choice(["Also ", "And ", "Plus ", "Oh and "]) + second)
        else:
            parts.append(fill(rng.choice(BANK_SECONDARY_FORMS), dict(BANK_SLOTS, cue=BANK_CUES[other]), rng))
    if rng.random() < 0.3:
        context = fill(rng.choice(BANK_CONTEXT), BANK_SLOTS, rng)
        parts.insert(0 if rng.random() < 0.4 else len(parts), context)
    if rng.random() < 0.45:
        opener = rng.choice(BANK_OPENERS)
        if opener.endswith(","):
            parts[0] = lower_first(parts[0])
        parts.insert(0, opener)
    if rng.random() < 0.5:
        parts.append(fill(rng.choice(BANK_CLOSERS), BANK_SLOTS, rng))
    text = fix_articles(" ".join(parts))
    if rng.random() < 0.35:
        text = apply_abbreviations(text, BANK_ABBREV, rng, p=0.6)
    if rng.random() < 0.15:
        text = add_typo(text, rng)
    if rng.random() < 0.15:  # typed on a phone
        text = text.lower().rstrip(".")
    return text


# --------------------------------------------------------------------------------------------------
# Clinical notes -> one-line summaries (the causal-LM demo, `--task causal-lm`)
# --------------------------------------------------------------------------------------------------

SUMMARY_ROWS = 1200  # DP-SGD cost is per step, not per row: more rows only lower the noise (smaller q)
# specialty -> (what the note says, how the summary says it). The summary is a fixed rewrite of the
# note's facts (age, sex, complaint, duration, history, where it goes), so a model can learn it.
SUMMARY_COMPLAINTS: dict[str, list[tuple[str, str]]] = {
    "cardiology": [
        ("complains of chest pain radiating to the {rad}", "chest pain radiating to the {rad}"),
        ("reports palpitations, worse when lying down", "palpitations"),
        ("fainted without warning, now alert", "syncope"),
        ("notes swelling of both ankles and gets breathless on stairs", "ankle swelling and exertional breathlessness"),
        ("describes chest pressure on exertion, relieved by rest", "exertional chest pressure"),
        ("says the heart is racing and feels lightheaded", "racing heart and lightheadedness"),
    ],
    "neurology": [
        ("complains of a severe headache with sensitivity to light", "severe headache with photophobia"),
        ("has sudden weakness on the {side} side", "sudden {side}-sided weakness"),
        ("had a seizure lasting about two minutes, now drowsy", "a seizure and drowsiness"),
        ("reports the room spinning, worse when turning the head", "positional vertigo"),
        ("has numbness and tingling in the {side} hand", "numbness of the {side} hand"),
        ("is confused and cannot recall recent events", "acute confusion"),
    ],
    "gastroenterology": [
        ("complains of abdominal pain with nausea and vomiting", "abdominal pain with vomiting"),
        ("reports black tarry stools", "melaena"),
        ("has burning upper abdominal pain after meals", "postprandial epigastric pain"),
        ("noticed yellow eyes and dark urine", "jaundice"),
        ("has difficulty swallowing, food feels stuck", "dysphagia"),
        ("reports pain that moved from the navel to the lower right abdomen", "right lower quadrant pain"),
    ],
    "pulmonology": [
        ("complains of shortness of breath, worse with exertion", "exertional breathlessness"),
        ("has a productive cough with green sputum and fever", "productive cough with fever"),
        ("is wheezing and using the inhaler every hour", "wheeze despite hourly inhaler"),
        ("coughed up blood-streaked sputum", "haemoptysis"),
        ("has sharp chest pain on breathing in after a long flight", "pleuritic chest pain after a long flight"),
        ("reports night sweats, cough and weight loss", "night sweats, cough and weight loss"),
    ],
    "orthopedics": [
        ("fell and has {joint} pain, unable to bear weight", "{joint} pain after a fall and unable to bear weight"),
        ("twisted the {joint} playing sport and heard a pop", "{joint} twisting injury with a pop"),
        ("has low back pain radiating down the {side} leg", "low back pain radiating to the {side} leg"),
        ("reports swelling and bruising of the {joint} after a fall", "{joint} swelling and bruising after a fall"),
        ("has a stiff, aching {joint}, worse in the mornings", "morning stiffness of the {joint}"),
        ("cannot raise the {side} arm after a fall", "inability to raise the {side} arm after a fall"),
    ],
}
SUMMARY_DURATIONS = [
    ("since yesterday", "for 1 day"), ("for 2 days", "for 2 days"), ("for 3 days", "for 3 days"),
    ("for the past week", "for 1 week"), ("for two weeks", "for 2 weeks"), ("since this morning", "since this morning"),
    ("for a few hours", "for hours"), ("for over a month", "for over a month"),
]
SUMMARY_SLOTS: dict[str, list[str]] = {
    "rad": ["left arm", "jaw", "back", "left shoulder", "neck"],
    "side": ["left", "right"],
    "joint": ["knee", "ankle", "wrist", "shoulder", "hip", "elbow"],
}
SUMMARY_INSTRUCTION = "Summarise this triage note in one line."


def clinical_summary(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, response, specialty): a short triage note and its one-line summary.

    The summary is one sentence of a fixed shape ("39-year-old man with exertional chest pressure for
    3 days; history of osteoarthritis; refer to cardiology."; "no relevant history" when the note names
    none): every row teaches the same shape, so a few DP-SGD steps already move the model (the shared
    shape gives the sites' clipped per-example gradients a common direction). It is plain English on
    purpose: an earlier shape of fields joined by " | " was far from what the instruction-tuned base
    writes, and under DP the adapter learned the separator's frequency before the fields, so greedy
    answers repeated it (docs/generative.md). Notes of one or two sentences keep an example within
    112 tokens with SmolLM2's chat template.
    """
    specialty = rng.choice(CLINICAL_LABELS)
    age = rng.randint(18, 92)
    male = rng.random() < 0.5
    note_phrase, summary_phrase = rng.choice(SUMMARY_COMPLAINTS[specialty])
    values = {name: rng.choice(options) for name, options in SUMMARY_SLOTS.items()}
    note_phrase, summary_phrase = note_phrase.format(**values), summary_phrase.format(**values)
    said, short = rng.choice(SUMMARY_DURATIONS)
    who = rng.choice([f"{age}-year-old {'man' if male else 'woman'}", f"{age}yo {'M' if male else 'F'}",
                      f"Patient, {'male' if male else 'female'}, {age},"])
    history = rng.choice(HISTORY) if rng.random() < 0.6 else ""
    note = f"{who} {note_phrase} {said}." + (f" History of {history}." if history else "")
    summary = (f"{age}-year-old {'man' if male else 'woman'} with {summary_phrase} {short}; "
               f"{f'history of {history}' if history else 'no relevant history'}; refer to {specialty}.")
    return f"{SUMMARY_INSTRUCTION}\n{note}", summary, specialty


def build_summaries(n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``n`` distinct (prompt, response, specialty) rows."""
    rows, seen = [], set()
    while len(rows) < n:
        row = clinical_summary(rng)
        if row[0] not in seen:  # a prompt in both train and test would flatter any model
            seen.add(row[0])
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Assembly, writing, and the bag-of-words check
# --------------------------------------------------------------------------------------------------


def build(
    sites: dict[str, tuple[int, list[int]]],
    labels: list[str],
    make: Callable[[str, bool, random.Random], str],
    rng: random.Random,
) -> tuple[list[tuple[str, str, str]], Counter[str]]:
    """Rows (text, label, site), and how many were made ambiguous and how many relabelled.

    Exact label quotas per site, then ambiguity, unique texts, and label noise last.
    """
    plan = [
        (site, lab)
        for site, (n, weights) in sites.items()
        for lab, k in zip(labels, quota(n, weights), strict=True)
        for _ in range(k)
    ]
    rng.shuffle(plan)
    seen: set[str] = set()
    rows: list[tuple[str, str, str]] = []
    tally: Counter[str] = Counter()
    for site, lab in plan:
        ambiguous = rng.random() < AMBIGUOUS_RATE
        tally["ambiguous"] += ambiguous
        text = make(lab, ambiguous, rng)
        while text in seen:  # a duplicate across train/test splits would flatter any baseline
            text = make(lab, ambiguous, rng)
        seen.add(text)
        if rng.random() < NOISE_RATE:
            lab = rng.choice([other for other in labels if other != lab])
            tally["relabelled"] += 1
        rows.append((text, lab, site))
    return rows, tally


# Dirt for `fedtune site prepare` to find, as real exports have it: rows replaced by an exact copy of another row
# (up to stray whitespace), by a near copy (punctuation, case, one word), rows with stray whitespace, and rows
# with a planted identifier. Every identifier is generated and reserved for fiction: e-mail at example.org /
# example.com / example.net (RFC 2606), phone numbers 555-0100..0199 (NANP) and 07700 900000..900999 (Ofcom).
DIRT = {"exact": 8, "near": 8, "whitespace": 20, "identifier": 12}
FIRST = ["ann", "bo", "carla", "dev", "eli", "fatima", "greg", "hana", "ivan", "jo", "kemal", "lena"]
LAST = ["lee", "ng", "okafor", "silva", "berg", "novak", "patel", "moreau", "kim", "walsh"]


def _email(rng: random.Random) -> str:
    sep = rng.choice([".", "_", ""])
    return f"{rng.choice(FIRST)}{sep}{rng.choice(LAST)}{rng.randint(1, 99)}@example.{rng.choice(['org', 'com', 'net'])}"


def _phone(rng: random.Random) -> str:
    return rng.choice([f"555-01{rng.randint(0, 99):02d}", f"(212) 555-01{rng.randint(0, 99):02d}",
                       f"07700 900{rng.randint(0, 999):03d}", f"+44 7700 900{rng.randint(0, 999):03d}"])


CLINICAL_IDENTIFIERS = ["Contact: {email}.", "Call back on {phone}.", "Daughter's number {phone}.", "GP email {email}."]
BANK_IDENTIFIERS = ["email me at {email}", "my number is {phone}", "reply to {email} pls", "call me on {phone}"]


def _stray_whitespace(text: str, rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return "  " + text + " "
    if kind == 1:
        return text.replace(" ", "  ", 2)
    if kind == 2:
        return text.replace(" ", "\u00a0", 1) + "\t"  # a no-break space from a word processor, a tab
    return text.replace(". ", ".   ", 1) + " "


def _near_copy(text: str, rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return text.replace(",", "").replace(".", "!") if "," in text or "." in text else text + "!"
    if kind == 1:
        return text.lower() if text != text.lower() else text.capitalize() + "."
    words = text.split(" ")
    long_ones = [i for i, w in enumerate(words) if len(w) > 5 and w.isalpha()]
    i = rng.choice(long_ones) if long_ones else len(words) - 1
    return " ".join(words[:i] + words[i + 1:])  # one word dropped


def add_dirt(rows: list[tuple[str, str, str]], identifiers: Sequence[str],
             rng: random.Random) -> tuple[list[tuple[str, str, str]], Counter[str]]:
    """Replace a few rows with dirty ones (`DIRT`), each keeping its label and site, so the counts per label and
    site stay as they are; the copied rows come from the same label and site."""
    rows = list(rows)
    targets = rng.sample(range(len(rows)), sum(DIRT.values()))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, lab, site) in enumerate(rows):
        groups.setdefault((lab, site), []).append(i)
    touched = set(targets)
    tally: Counter[str] = Counter()
    for kind, count in DIRT.items():
        for _ in range(count):
            j = targets.pop()
            text, lab, site = rows[j]
            if kind in ("exact", "near"):
                source = rng.choice([i for i in groups[(lab, site)] if i not in touched])
                touched.add(source)
                text = rows[source][0]
                text = _stray_whitespace(text, rng) if kind == "exact" and rng.random() < 0.5 else text
                text = _near_copy(text, rng) if kind == "near" else text
            elif kind == "whitespace":
                text = _stray_whitespace(text, rng)
            else:
                planted = rng.choice(identifiers).format(email=_email(rng), phone=_phone(rng))
                text = f"{text} {planted}" if text.rstrip().endswith((".", "!", "?")) else f"{text}, {planted}"
            rows[j] = (text, lab, site)
            tally[kind] += 1
    return rows, tally


def write_csv(path: Path, header: list[str], rows: list[tuple[str, str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def naive_bayes_accuracy(rows: list[tuple[str, str, str]], split_seed: int) -> float:
    """Multinomial Naive Bayes on word counts (Laplace smoothing); train on 80%, accuracy on the other 20%."""
    order = list(range(len(rows)))
    random.Random(split_seed).shuffle(order)
    cut = int(0.8 * len(rows))
    train, test = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    labels = sorted({lab for _, lab, _ in rows})
    word_counts: dict[str, Counter[str]] = {lab: Counter() for lab in labels}
    docs = Counter(lab for _, lab, _ in train)
    for text, lab, _ in train:
        word_counts[lab].update(tokens(text))
    vocab = set().union(*word_counts.values())
    totals = {lab: sum(word_counts[lab].values()) for lab in labels}
    correct = 0
    for text, lab, _ in test:
        words = [w for w in tokens(text) if w in vocab]
        scores = {
            c: math.log(docs[c] / len(train))
            + sum(math.log((word_counts[c][w] + 1) / (totals[c] + len(vocab))) for w in words)
            for c in labels
        }
        correct += max(labels, key=scores.__getitem__) == lab
    return correct / len(test)


def report(
    name: str, rows: list[tuple[str, str, str]], tally: Counter[str], labels: list[str], sites: list[str]
) -> None:
    sizes = Counter(lab for _, lab, _ in rows)
    print(f"{name}: {len(rows)} rows ({tally['ambiguous']} ambiguous, {tally['relabelled']} relabelled); "
          + ", ".join(f"{lab} {sizes[lab]}" for lab in labels))
    for site in sites:
        counts = Counter(lab for _, lab, s in rows if s == site)
        print(f"  {site}: " + ", ".join(f"{lab} {counts[lab]}" for lab in labels))
    accs = [naive_bayes_accuracy(rows, SEED + k) for k in range(5)]
    print(f"  naive Bayes, 80/20 split seed {SEED}: test accuracy {accs[0]:.3f}")
    print(f"  naive Bayes over 5 splits: mean {sum(accs) / 5:.3f}, min {min(accs):.3f}, max {max(accs):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=HERE, help="where to write the CSVs (default: next to this script)"
    )
    parser.add_argument(
        "--check", action="store_true", help="print label counts and a bag-of-words baseline accuracy"
    )
    parser.add_argument(
        "--scale", type=int, default=1,
        help="rows per hospital/branch times this (benchmarks only; the shipped files use 1)",
    )
    args = parser.parse_args()
    if args.scale < 1:
        parser.error(f"--scale must be >= 1, got {args.scale}")
    hospitals = {k: (n * args.scale, w) for k, (n, w) in HOSPITALS.items()}
    branches = {k: (n * args.scale, w) for k, (n, w) in BRANCHES.items()}

    clinical, clinical_tally = build(hospitals, CLINICAL_LABELS, clinical_note, random.Random(SEED))
    bank, bank_tally = build(branches, BANK_LABELS, bank_message, random.Random(SEED + 1))
    # Dirt from streams of their own, drawn last: the clean rows above stay as they were.
    clinical, _ = add_dirt(clinical, CLINICAL_IDENTIFIERS, random.Random(SEED + 3))
    bank, _ = add_dirt(bank, BANK_IDENTIFIERS, random.Random(SEED + 4))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "clinical_triage.csv", ["text", "label", "hospital"], clinical)
    write_csv(args.out_dir / "bank_intents.csv", ["text", "label", "branch"], bank)
    # The causal-LM demo: its own generator stream, so it leaves the classification files unchanged.
    summaries = build_summaries(SUMMARY_ROWS * args.scale, random.Random(SEED + 2))
    write_csv(args.out_dir / "clinical_summaries.csv", ["prompt", "response", "specialty"], summaries)
    if args.check:
        report("clinical_triage.csv", clinical, clinical_tally, CLINICAL_LABELS, list(HOSPITALS))
        report("bank_intents.csv", bank, bank_tally, BANK_LABELS, list(BRANCHES))


if __name__ == "__main__":
    main()
