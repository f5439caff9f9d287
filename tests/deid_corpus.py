"""A generated corpus of clinical and bank sentences with planted identifiers (all synthetic), seeded.

Each planted sentence holds exactly one identifier, so the de-identified sentence it should become is
known: the template with the identifier replaced by its tag. Identifier-free sentences (doses, blood
pressures, amounts, departments, drug names, months) measure false redactions. The checksums of
IBANs (ISO 13616 mod 97) and card numbers (Luhn) are computed here, independently of Presidio, and
pinned by a test to published example numbers.

Names are a hand-made list, not the gazetteer the name recognizer uses (Faker's): some are in it,
some (transliterated, compound, rare) are not, so the recall figure shows what the gazetteer misses.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class Planted:
    """One sentence: its text, the entity planted (None: identifier-free), the value and its format."""

    text: str
    entity: str | None
    value: str
    fmt: str

    def expected(self, tag: str) -> str:
        """The sentence as de-identification should leave it (``tag`` stands in for the value)."""
        return self.text.replace(self.value, tag, 1) if self.entity else self.text


# --- checksums -------------------------------------------------------------------------------------

def iban_check_digits(country: str, bban: str) -> str:
    """ISO 13616: move country + '00' to the end, letters to 10..35, 98 - (n mod 97)."""
    digits = "".join(str(int(c, 36)) for c in (bban + country + "00").upper())
    return f"{98 - int(digits) % 97:02d}"


def iban_valid(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()][::-1]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return next(body + d for d in string.digits if luhn_valid(body + d))


# --- values ----------------------------------------------------------------------------------------

NAMES = [  # first, last
    ("John", "Smith"), ("Mary", "Johnson"), ("Robert", "Williams"), ("Linda", "Brown"), ("Michael", "Miller"),
    ("Susan", "Davis"), ("David", "Wilson"), ("Karen", "Taylor"), ("Thomas", "Anderson"), ("Emily", "Clarke"),
    ("Anna", "Weber"), ("Lukas", "Schneider"), ("Sophie", "Dubois"), ("Pierre", "Lefebvre"), ("Giulia", "Rossi"),
    ("Marco", "Bianchi"), ("Carmen", "Garcia"), ("Javier", "Fernandez"), ("Sanne", "de Vries"), ("Daan", "Jansen"),
    ("Siobhan", "O'Brien"), ("Connor", "McCarthy"), ("Aisha", "Rahman"), ("Oluwaseun", "Adeyemi"), ("Wei", "Zhang"),
    ("Hiroshi", "Tanaka"), ("Priya", "Raghunathan"), ("Nguyen", "Van Thanh"), ("Kwame", "Mensah"), ("Leilani", "Kahale"),
    ("Olga", "Ivanova"), ("Mehmet", "Yilmaz"), ("Ingrid", "Lindqvist"), ("Tomasz", "Kowalski"), ("Fatima", "Haddad"),
]
US_AREAS = ["212", "312", "415", "617", "713", "206", "303", "404"]
US_PLACES = [("Springfield", "IL", "62704"), ("Boston", "MA", "02115"), ("Austin", "TX", "78701"), ("Denver", "CO", "80202"),
             ("Seattle", "WA", "98101"), ("Miami", "FL", "33101")]
GB_POSTCODES = ["SW1A 1AA", "M1 1AE", "EH1 1YZ", "B33 8TH", "CR2 6XH", "LS1 4AP", "DN55 1PT", "W1A 0AX"]
CA_POSTCODES = ["K1A 0B1", "M5V 3L9", "H2X 1Y4", "V6B 4Y8"]
EU_CITIES = [("10115", "Berlin"), ("80331", "München"), ("75008", "Paris"), ("69002", "Lyon"), ("50667", "Köln")]
NL_POSTCODES = [("1012 AB", "Amsterdam"), ("3511 LX", "Utrecht"), ("2511 CV", "Den Haag")]
DOMAINS = ["example.org", "mail.example.com", "hospital-a.example.net", "bank.example.co.uk", "example.de"]
MONTHS = ["January", "February", "March", "April", "June", "July", "August", "September", "October", "November", "December"]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def email(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(NAMES)
    last = last.replace(" ", "").replace("'", "")
    fmt = rng.choice(["first.last", "flast", "first_last+tag", "UPPER", "first.last", "flast", "obfuscated [at]"])
    local = {"first.last": f"{first}.{last}".lower(), "flast": f"{first[0]}{last}".lower(),
             "first_last+tag": f"{first}_{last}+clinic".lower(), "UPPER": f"{first}.{last}".upper(),
             "obfuscated [at]": f"{first}.{last}".lower()}[fmt]
    return f"{local}{' [at] ' if fmt == 'obfuscated [at]' else '@'}{rng.choice(DOMAINS)}", fmt


def phone(rng: random.Random) -> tuple[str, str]:
    # The last three are the demo files' forms (common/demo_data/generate.py's _phone), in ranges reserved for
    # fiction that libphonenumber's validity check refuses: Ofcom's drama mobiles, NANP's 555-0100..0199.
    fmt = rng.choice(["us-paren", "us-dash", "us-dot", "us-intl", "gb-intl", "gb-national", "gb-mobile", "de-intl", "de-national",
                      "fr-national", "fr-intl", "us-compact", "gb-intl-(0)", "gb-mobile-intl", "us-555-01xx", "us-paren-555-01xx"])
    a, x, n = rng.choice(US_AREAS), str(rng.randint(2, 9)) + _digits(rng, 2), _digits(rng, 4)
    value = {
        "us-paren": f"({a}) {x}-{n}", "us-dash": f"{a}-{x}-{n}", "us-dot": f"{a}.{x}.{n}", "us-intl": f"+1 {a} {x} {n}",
        "gb-intl": f"+44 20 7946 0{_digits(rng, 3)}", "gb-national": f"020 7946 0{_digits(rng, 3)}",
        "gb-mobile": f"07700 900{_digits(rng, 3)}", "de-intl": f"+49 30 {rng.randint(2, 9)}{_digits(rng, 6)}",
        "de-national": f"030 {rng.randint(2, 9)}{_digits(rng, 6)}", "fr-national": f"0{rng.randint(1, 5)} " + " ".join(_digits(rng, 2) for _ in range(4)),
        "fr-intl": f"+33 {rng.randint(1, 5)} " + " ".join(_digits(rng, 2) for _ in range(4)),
        "us-compact": f"{a}{x}{n}", "gb-intl-(0)": f"+44 (0)20 7946 0{_digits(rng, 3)}",
        "gb-mobile-intl": f"+44 7700 900{_digits(rng, 3)}", "us-555-01xx": f"555-01{_digits(rng, 2)}",
        "us-paren-555-01xx": f"({a}) 555-01{_digits(rng, 2)}",
    }[fmt]
    return value, fmt


def date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1940, 2024), rng.randint(1, 12), rng.randint(1, 28)
    month = MONTHS[(m - 1) % len(MONTHS)]
    fmt = rng.choice(["mm/dd/yyyy", "dd/mm/yy", "iso", "dd.mm.yyyy", "d Month yyyy", "Month d, yyyy", "Mon dth yyyy", "dd-Mon-yyyy",
                      "yyyymmdd-dob", "dd-mm-yy", "dth of Month (no year)"])
    value = {
        "mm/dd/yyyy": f"{m:02d}/{d:02d}/{y}", "dd/mm/yy": f"{d}/{m}/{y % 100:02d}", "iso": f"{y}-{m:02d}-{d:02d}",
        "dd.mm.yyyy": f"{d:02d}.{m:02d}.{y}", "d Month yyyy": f"{d} {month} {y}", "Month d, yyyy": f"{month} {d}, {y}",
        "Mon dth yyyy": f"{month[:3]} {d}th {y}", "dd-Mon-yyyy": f"{d:02d}-{month[:3]}-{y}", "yyyymmdd-dob": f"{y}{m:02d}{d:02d}",
        "dd-mm-yy": f"{d:02d}-{m:02d}-{y % 100:02d}", "dth of Month (no year)": f"{d}th of {month}",
    }[fmt]
    return value, fmt


def postal(rng: random.Random) -> tuple[str, str, str]:
    """(value, format, the text around it with {v} where the value goes)."""
    fmt = rng.choice(["us-state", "us-zip4", "us-cue", "gb", "ca", "de-city", "fr-city", "nl-city", "us-bare"])
    if fmt.startswith("us"):
        city, state, zip5 = rng.choice(US_PLACES)
        if fmt == "us-state":
            return zip5, fmt, f"{city}, {state} {{v}}"
        if fmt == "us-bare":  # a 5-digit number with nothing around it that says postal code
            return zip5, fmt, f"{city} {{v}}"
        if fmt == "us-zip4":
            return f"{zip5}-{_digits(rng, 4)}", fmt, f"{city} {{v}}"
        return zip5, fmt, "ZIP code {v}"
    if fmt == "gb":
        return rng.choice(GB_POSTCODES), fmt, "postcode {v}"
    if fmt == "ca":
        return rng.choice(CA_POSTCODES), fmt, "Ottawa ON {v}"
    if fmt == "nl-city":
        code, city = rng.choice(NL_POSTCODES)
        return code, fmt, f"{{v}} {city}"
    code, city = rng.choice([c for c in EU_CITIES if (c[0][0] in "1358") == (fmt == "de-city")] or EU_CITIES)
    return code, fmt, f"{{v}} {city}"


def mrn(rng: random.Random) -> tuple[str, str, str]:
    fmt = rng.choice(["MRN:", "MRN", "medical record number", "MR#", "patient ID", "chart no.", "bare #"])
    value = rng.choice([_digits(rng, 8), _digits(rng, 7), "AB-" + _digits(rng, 6), _digits(rng, 3) + "-" + _digits(rng, 4)])
    cue = {"MRN:": "MRN: {v}", "MRN": "MRN {v}", "medical record number": "medical record number {v}", "MR#": "MR# {v}",
           "patient ID": "patient ID {v}", "chart no.": "Chart No. {v}", "bare #": "#{v}"}[fmt]
    return value, fmt, cue


def account(rng: random.Random) -> tuple[str, str, str]:
    fmt = rng.choice(["account number", "acct #", "account no.", "ending in", "customer number", "policy number", "sort code",
                      "bare (no cue)"])
    if fmt == "sort code":
        return f"{_digits(rng, 2)}-{_digits(rng, 2)}-{_digits(rng, 2)}", fmt, "sort code {v}"
    value = _digits(rng, 4) if fmt == "ending in" else rng.choice([_digits(rng, 8), _digits(rng, 10), f"{_digits(rng, 2)}-{_digits(rng, 4)}-{_digits(rng, 2)}"])
    cue = {"account number": "account number {v}", "acct #": "acct #{v}", "account no.": "account no. {v}",
           "ending in": "account ending in {v}", "customer number": "customer number {v}", "policy number": "policy number {v}", "bare (no cue)": "{v}"}[fmt]
    return value, fmt, cue


IBAN_FORMATS = {"DE": 18, "GB": None, "FR": 23, "NL": None, "ES": 20}


def iban(rng: random.Random, *, valid: bool = True) -> tuple[str, str]:
    country = rng.choice(list(IBAN_FORMATS))
    if country == "GB":
        bban = rng.choice(["WEST", "NWBK", "BARC"]) + _digits(rng, 14)
    elif country == "NL":
        bban = rng.choice(["ABNA", "INGB", "RABO"]) + _digits(rng, 10)
    elif country == "FR":
        bban = _digits(rng, 10) + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(11)) + _digits(rng, 2)
    else:
        bban = _digits(rng, IBAN_FORMATS[country])
    check = iban_check_digits(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 90)) % 97 + 2:02d}" if check != "99" else "03"
    compact = country + check + bban
    grouped = rng.random() < 0.6
    value = " ".join(compact[i:i + 4] for i in range(0, len(compact), 4)) if grouped else compact
    return value, f"{country}-{'grouped' if grouped else 'compact'}"


def card(rng: random.Random, *, valid: bool = True) -> tuple[str, str]:
    brand = rng.choice(["visa", "mastercard", "amex", "discover", "visa", "mastercard-2series"])
    prefix, length = {"visa": ("4", 16), "mastercard": (str(rng.randint(51, 55)), 16), "amex": (rng.choice(["34", "37"]), 15),
                      "discover": ("6011", 16), "mastercard-2series": (str(rng.randint(2221, 2720)), 16)}[brand]
    number = luhn_complete(prefix, length, rng)
    if not valid:
        number = number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)
    style = rng.choice(["spaced", "dashed", "compact"])
    if style == "compact":
        value = number
    elif brand == "amex":
        sep = " " if style == "spaced" else "-"
        value = sep.join((number[:4], number[4:10], number[10:]))
    else:
        value = (" " if style == "spaced" else "-").join(number[i:i + 4] for i in range(0, 16, 4))
    return value, f"{brand}-{style}"


def person(rng: random.Random) -> tuple[str, str, str]:
    first, last = rng.choice(NAMES)
    fmt = rng.choice(["Dr. Last", "Dr First Last", "Mrs. Last", "patient First Last", "First Last (bare)", "Last, First",
                      "signed by First Last", "account holder First Last", "Ms First Last", "Name: First Last",
                      "lowercase patient first last", "First only (bare)"])
    full = f"{first} {last}"
    return {
        "Dr. Last": (last, fmt, "Dr. {v}"), "Dr First Last": (full, fmt, "Dr {v}"), "Mrs. Last": (last, fmt, "Mrs. {v}"),
        "patient First Last": (full, fmt, "patient {v}"), "First Last (bare)": (full, fmt, "{v}"),
        "Last, First": (f"{last}, {first}", fmt, "{v}"), "signed by First Last": (full, fmt, "signed by {v}"),
        "account holder First Last": (full, fmt, "account holder {v}"), "Ms First Last": (full, fmt, "Ms {v}"),
        "Name: First Last": (full, fmt, "the customer (name: {v})"),
        "lowercase patient first last": (full.lower(), fmt, "patient {v}"), "First only (bare)": (first, fmt, "{v}"),
    }[fmt]


# Sentence frames per entity type; {x} is where the identifier (with its cue, for cue-found types) goes.
FRAMES: dict[str, list[str]] = {
    "EMAIL": ["Results were sent to {x} after the visit.", "The customer asked us to write to {x} about the loan.",
              "Discharge summary copied to {x} on request.", "Please contact {x} for the statement."],
    "PHONE": ["The daughter can be reached on {x} after 5 pm.", "Customer called from {x} to report the lost card.",
              "Call back on {x} regarding the lab results.", "Emergency contact number: {x}."],
    "DATE": ["Admitted on {x} with chest pain.", "DOB {x}; allergies none known.", "The transfer was booked on {x}.",
             "Follow-up visit scheduled for {x} in the clinic."],
    "POSTAL_CODE": ["Patient lives at 12 Elm Street, {x}.", "Statement mailed to the branch in {x}.", "Address on file: 4 Main Road, {x}."],
    "MRN": ["Lab results filed under {x} this morning.", "Please attach the scan to {x}.", "Readmitted, {x}, with fever."],
    "ACCOUNT": ["The payment was returned to {x} yesterday.", "Overdraft fee charged on {x} in error.", "Please freeze {x} until further notice."],
    "IBAN": ["Refund to IBAN {x} approved.", "Salary arrives from {x} each month.", "Beneficiary account {x} was verified."],
    "CARD": ["Card {x} was reported stolen.", "The charge on {x} was disputed.", "Customer paid with {x} at the pharmacy."],
    "PERSON": ["{x} was admitted overnight for observation.", "Discussed the care plan with {x} today.",
               "The loan application was reviewed; {x} agreed to the terms.", "Referral letter written, {x} to follow up."],
}

CLEAN = [
    "Patient reports chest pain 7/10, radiating to the left arm.", "BP 132/84, HR 88, SpO2 97% on room air.",
    "Given 500 mg paracetamol at 14:00 and 4 mg ondansetron IV.", "Transferred to the Emergency Department for observation.",
    "Started Lisinopril 10 mg once daily; review in 2 weeks.", "No known drug allergies. Smoker, 20 pack-years.",
    "Seen in Cardiology clinic; echo shows EF 55%.", "Blood glucose 8.4 mmol/L before meals.",
    "The customer disputes a charge of $1,250.00 from last week.", "Interest rate fixed at 4.5% for 24 months.",
    "Balance of 12400 EUR after the transfer.", "Daily withdrawal limit raised to 2000 USD.",
    "The branch opens Monday to Friday, 9:00 to 17:00.", "Loan term extended by 6 months at the same rate.",
    "Mortgage application approved subject to valuation.", "Patient Portal access was reset at the front desk.",
    "Wound dressing changed; no signs of infection.", "Metformin 850 mg twice daily with meals.",
    "Physiotherapy twice weekly for 6 weeks.", "The card was blocked after 3 failed PIN attempts.",
    "Referred to Neurology for recurrent headaches.", "Temperature 38.2 C overnight, settled with fluids.",
    "CT head negative for acute bleed.", "In May the bank introduced a new savings product.",
    "Dose increased from 25 mg to 50 mg after the review.", "Customer Services closed the complaint as resolved.",
    "Potassium 4.1, sodium 139, creatinine 88.", "Insulin glargine 18 units at night.",
    "The ward round found the patient comfortable.", "Standing order of 150 GBP every month.",
    "Chest X-ray clear; discharge planned for tomorrow.", "Grace period of 14 days applies to late payments.",
    "Two units of blood transfused without reaction.", "Pain score improved from 8 to 3 after analgesia.",
    "Appointment rescheduled at the request of the family.", "Fraud team flagged 2 transactions for review.",
    "Platelets 245, white cell count 11.2.", "Nurse-led clinic on Wednesday afternoons.",
    "Exchange rate applied: 1.17 at the time of transfer.", "Hip replacement, day 3, mobilising with a frame.",
]


def generate(n_per_type: int = 100, *, seed: int = 0) -> list[Planted]:
    """``n_per_type`` planted sentences for each entity type (9 types: 900 by default), then the CLEAN ones."""
    out: list[Planted] = []
    for entity, frames in FRAMES.items():
        # One seeded stream per type: a format added to one type leaves the other types' sentences as they were.
        rng = random.Random(f"{seed}/{entity}")
        for _ in range(n_per_type):
            frame = rng.choice(frames)
            around = "{v}"
            if entity == "EMAIL":
                value, fmt = email(rng)
            elif entity == "PHONE":
                value, fmt = phone(rng)
            elif entity == "DATE":
                value, fmt = date(rng)
                if fmt == "yyyymmdd-dob":
                    frame = "DOB {x}; allergies none known."
            elif entity == "IBAN":
                value, fmt = iban(rng)
            elif entity == "CARD":
                value, fmt = card(rng)
            else:
                value, fmt, around = {"POSTAL_CODE": postal, "MRN": mrn, "ACCOUNT": account, "PERSON": person}[entity](rng)
            text = frame.replace("{x}", around.replace("{v}", value))
            if text.startswith(value):
                pass
            elif text[0].islower():
                text = text[0].upper() + text[1:]
            out.append(Planted(text=text, entity=entity, value=value, fmt=fmt))
    out.extend(Planted(text=t, entity=None, value="", fmt="clean") for t in CLEAN)
    return out


def bad_checksums(n: int = 20, *, seed: int = 1) -> list[Planted]:
    """IBANs and card numbers whose check digits are wrong, in the same frames."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        value, fmt = iban(rng, valid=False)
        out.append(Planted(text=rng.choice(FRAMES["IBAN"]).replace("{x}", value), entity="IBAN", value=value, fmt=fmt))
        value, fmt = card(rng, valid=False)
        out.append(Planted(text=rng.choice(FRAMES["CARD"]).replace("{x}", value), entity="CARD", value=value, fmt=fmt))
    return out
