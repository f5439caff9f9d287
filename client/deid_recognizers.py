"""The recognizers behind ``client.deid``: Presidio's pattern recognizers, and ours where it has none.

Everything here works offline and loads no model:
- the NLP engine is ``spacy.blank("en")`` (a tokenizer, no NER): Presidio's default engine would load,
  and download if missing, the spaCy model en_core_web_lg, which a site must not fetch at run time;
- Presidio's e-mail recognizer checks the domain with ``tldextract``, which by default fetches the public
  suffix list over the network and caches it under the home folder: ours reads the snapshot tldextract ships;
- person names come from patterns (titles, cue words such as "patient" or "account holder") and a
  gazetteer of first and last names from Faker's person providers (a maintained PyPI package, no model).

Presidio (Microsoft, MIT): https://github.com/microsoft/presidio. Each entity type is one fedtune name
(``ENTITIES`` in ``client/deid.py``); each recognizer reports it directly, so no mapping is needed.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import regex

from presidio_analyzer import AnalyzerEngine, EntityRecognizer, Pattern, RecognizerRegistry, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    DateRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
)

# A name token: "Smith", "O'Brien", "McDonald", "Smith-Jones", "Zoë". Case-sensitive on purpose.
NAME = r"\p{Lu}\p{Ll}*(?:'\p{Lu})?\p{Ll}+(?:\p{Lu}\p{Ll}+)?(?:-\p{Lu}\p{Ll}+)?"
PARTICLE = r"(?:van|von|der|den|de|la|le|del|della|da|di|du|dos|das|bin|ibn|al|ten|ter)"
# Up to three name tokens, with lowercase particles ("Maria de la Cruz") and one middle initial ("John A. Smith").
FULL_NAME = rf"{NAME}(?:\s+(?:{PARTICLE}\s+){{0,2}}(?:\p{{Lu}}\.\s+)?{NAME}){{0,2}}"
TITLES = r"(?:Dr|Mr|Mrs|Ms|Mx|Miss|Prof|Herr|Frau|Mme|Mlle|Sr|Sra)"
# Words after which a capitalised token is taken for a name (case-insensitive).
NAME_CUES = (
    r"patient(?:'s)?(?:\s+name)?|pt\.?|name|named|full\s+name|signed(?:\s+by)?|seen\s+by|referred\s+by|attending|"
    r"physician|nurse|caregiver|guardian|next\s+of\s+kin|husband|wife|son|daughter|mother|father|spouse|"
    r"customer(?:\s+name)?|client(?:\s+name)?|account\s+holder|cardholder|card\s+holder|beneficiary|payee|applicant|"
    r"insured|policyholder|member|contact|caller|witness|dear|attn\.?"
)
# Capitalised words that follow a cue without being names ("Patient Portal", "Name: Unknown"): kept.
NOT_NAMES = frozenset("""
a an the this that these those he she they it his her their its we our you your i my me him them who whom
is was are were has had have be been being will would can could should may might must shall do does did
not no yes none unknown anonymous n/a na portal education transport care services service support record records
id number no reports report presents presented denies denied admitted discharged states stated notes note
in on at of for from to with by and or but if as into about after before during over under
mr mrs ms dr prof miss sir madam team department dept unit ward clinic hospital bank branch office
monday tuesday wednesday thursday friday saturday sunday january february march april june july august
september october november december today tomorrow yesterday morning evening night
""".split())
# Gazetteer first names that are also common English words: never a name on their own evidence.
AMBIGUOUS_FIRST = frozenset("""
will may june april august grace hope faith joy rose mark bill art guy major sunny summer autumn dawn ivy lily
holly ruby pearl iris violet daisy amber crystal jade penny chance frank rich sterling jack page drew cliff
dean gene ray rod sue pat ted lee earl king prince carol don else de van le la della
""".split())
MONTHS = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?|"
          r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
US_STATES = ("AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY "
             "NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC").split()
# Postal-code formats by region (ISO 3166 code); a bare 5-digit number is a code only with evidence
# around it (a state abbreviation, a cue word, or a city name after it), or every dose and count would be one.
POSTAL_CODE_CUE = r"(?i:\b(?:zip(?:\s*code)?|postal\s*code|post\s*code|postcode|plz|code\s+postal|cp)\b\s*[:#]?\s*)"
POSTAL_FORMATS: dict[str, tuple[str, ...]] = {
    "US": (rf"\b(?:{'|'.join(US_STATES)})\s+(?P<id>\d{{5}}(?:-\d{{4}})?)\b", r"\b(?P<id>\d{5}-\d{4})\b",
           rf"{POSTAL_CODE_CUE}(?P<id>\d{{5}}(?:-\d{{4}})?)\b"),
    "GB": (r"\b(?P<id>(?:[A-Z]{1,2}\d[A-Z\d]?|GIR)\s?\d[ABD-HJLNP-UW-Z]{2})\b",),
    "CA": (r"\b(?P<id>[ABCEGHJ-NPRSTVXY]\d[ABCEGHJ-NPRSTV-Z]\s?\d[ABCEGHJ-NPRSTV-Z]\d)\b",),
    "DE": (r"\b(?P<id>(?:D-)?\d{5})(?=\s+\p{Lu}\p{Ll}{2,})", rf"{POSTAL_CODE_CUE}(?P<id>\d{{5}})\b"),
    "FR": (r"\b(?P<id>(?:F-)?\d{5})(?=\s+\p{Lu}\p{Ll}{2,})", rf"{POSTAL_CODE_CUE}(?P<id>\d{{5}})\b"),
    "NL": (r"\b(?P<id>[1-9]\d{3}\s?(?!SA|SD|SS)[A-Z]{2})(?=\s+\p{Lu}\p{Ll}{2,})",),
}
REGIONS = tuple(POSTAL_FORMATS)
# Medical record numbers and account numbers: identifiers of no fixed format, found by the words before them.
MRN_CUE = (r"(?i:\b(?:MRN\b|MR\s?\#|med(?:ical)?\s+rec(?:ord)?\.?(?:\s*(?:no\.|num(?:ber)?\b|\#))?|"
           r"patient\s+(?:id\b|no\.|number\b|\#)|chart\s+(?:no\.|no\b|number\b|\#)|hospital\s+(?:id\b|no\.|number\b)))"
           r"\s*(?:is\s+|:\s*|\#\s*|-\s*)?")
ACCOUNT_CUE = (r"(?i:\b(?:account|acct\.?|a/c|customer|member|policy|loan|contract)\s*(?:number|num\.?|no\.?|id|#)?\s*"
               r"(?:is\s+|ending\s+in\s+|:\s*|#\s*|-\s*)?|\bsort\s+code\s*:?\s*|\brouting\s+(?:number|no\.?)\s*:?\s*)")
# Presidio's card pattern starts with 1, 3, 4, 5 or 6; Mastercard has also issued 2221-2720 since 2017.
MASTERCARD_2_SERIES = Pattern("Mastercard 2-series", r"\b(?:222[1-9]|22[3-9]\d|2[3-6]\d{2}|27[01]\d|2720)(?:[- ]?\d{4}){3}\b", 0.3)
ID_VALUE = r"(?P<id>(?:[A-Z]{1,3}-?)?\d(?:[ -]?\d){3,19})(?![\w-])"


# Telephone numbers reserved for fiction, which libphonenumber's validity check refuses (no operator holds
# them, so they are "possible" but not "valid"): generated data uses them (fedtune's demo files, test
# fixtures), and so do notes copied from it. Ofcom's drama ranges, as national significant numbers (the
# digits after 0 or +44; all ten long): mobile 07700 900xxx; London 020 7946 0xxx; Leeds..Manchester
# 01xx 496 0xxx; Tyneside 0191 498 0xxx; Northern Ireland 028 9649 6xxx; Cardiff 029 2018 0xxx; the
# fictional area 01632 960xxx; freephone 08081 570xxx; premium rate 0909 879 0xxx; UK-wide 03069 990xxx.
GB_DRAMA = regex.compile(r"7700900\d{3}|2079460\d{3}|1(?:1[3-8]|[2-6]1)4960\d{3}|1914980\d{3}|2896496\d{3}|2920180\d{3}|"
                         r"1632960\d{3}|8081570\d{3}|9098790\d{3}|3069990\d{3}")
GB_INTERNATIONAL = r"(?:\+|00)44[ .-]?(?:\(0\)[ .-]?)?"
# NANP's 555-0100..0199, the range set aside for fiction, with or without an area code and +1: the only
# seven-digit numbers looked for (any other seven digits are as likely a dose, a count or a reference).
NANP_AREA = r"(?:\(\d{3}\) ?|\d{3}[ .-])"
NANP_FICTION = rf"(?<![\w+])(?P<id>(?:(?:\+?1[ .-]?)?{NANP_AREA})?555[ .-]01\d\d)(?![\w-])"
NANP_FICTION_INTERNATIONAL = rf"(?<![\w+])(?P<id>\+1[ .-]?{NANP_AREA}555[ .-]01\d\d)(?![\w-])"


def _gb_drama(text: str, start: int, end: int) -> bool:
    return GB_DRAMA.fullmatch("".join(c for c in text[start:end] if c.isdigit())[-10:]) is not None


def fiction_phone_recognizers(regions: tuple[str, ...]) -> list[EntityRecognizer]:
    """Numbers in the ranges reserved for fiction (see ``GB_DRAMA``, ``NANP_FICTION``): international forms
    whatever ``regions`` are, national ones for their region (GB; US or CA)."""
    gb_prefix = f"(?:{GB_INTERNATIONAL}|0)" if "GB" in regions else GB_INTERNATIONAL
    nanp = NANP_FICTION if {"US", "CA"} & set(regions) else NANP_FICTION_INTERNATIONAL
    return [
        # 0.6: above a libphonenumber finding (0.4 before context) in the same digits, below a cued account number.
        GroupRegexRecognizer("PHONE", [rf"(?<![\w+])(?P<id>{gb_prefix}\d(?:[ .-]?\d){{9}})(?![\w-])"], score=0.6, check=_gb_drama),
        GroupRegexRecognizer("PHONE", [nanp], score=0.6),
    ]


class BlankEnglishEngine(SpacyNlpEngine):
    """spaCy's blank English pipeline: tokens for Presidio's context words, no model to load or download.

    A blank pipeline has no lemmatizer; the lower-cased token stands in for the lemma, which is what
    Presidio's context enhancer compares with a recognizer's context words ("mrn", "phone", ...).
    """

    def load(self) -> None:
        import spacy

        nlp = spacy.blank("en")
        nlp.add_pipe("fedtune_lower_lemma")
        self.nlp = {"en": nlp}


@functools.cache
def _register_lemma_component() -> None:
    from spacy.language import Language

    @Language.component("fedtune_lower_lemma")
    def lower_lemma(doc: Any) -> Any:
        for token in doc:
            token.lemma_ = token.lower_
        return doc


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, its domain check against tldextract's bundled public-suffix snapshot."""

    @functools.cached_property
    def _extract(self) -> Any:
        import tldextract

        # No suffix-list URLs and no cache folder: nothing is fetched, nothing is written.
        return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    def validate_result(self, pattern_text: str) -> bool:
        return self._extract(pattern_text).fqdn != ""


class CandidatePhoneRecognizer(PhoneRecognizer):
    """Presidio's phone recognizer (libphonenumber's matcher, one pass per region), run on phone-like
    stretches only (7+ digits with the usual separators): the whole text once per region cost ~10 ms
    a row in clinical notes full of doses and dates, most of it parsing numbers that are none."""

    CANDIDATE = regex.compile(r"(?<![\w+])\+?\(?\d[\d\s().\-]{5,}\d(?!\w)")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        results: list[RecognizerResult] = []
        for candidate in self.CANDIDATE.finditer(text):
            if sum(c.isdigit() for c in candidate.group()) < 7:
                continue
            offset = candidate.start()
            for found in super().analyze(candidate.group(), entities, None):
                found.start += offset
                found.end += offset
                results.append(found)
        return results


class GroupRegexRecognizer(EntityRecognizer):
    """Case-sensitive regular expressions whose named group ``id`` (or the whole match) is the entity.

    Presidio's PatternRecognizer redacts the whole match and its analyzer matches case-insensitively;
    a cue word ("MRN:", "patient") must stay in the text, and a name needs its capital letter.
    """

    def __init__(self, entity: str, patterns: Iterable[str], *, score: float, check: Any = None) -> None:
        self._patterns = [regex.compile(p, regex.VERSION1) for p in patterns]
        self._score = score
        self._check = check  # optional: (text, start, end) -> bool
        super().__init__(supported_entities=[entity], name=f"fedtune-{entity.lower()}")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None) -> list[RecognizerResult]:
        found: dict[tuple[int, int], RecognizerResult] = {}
        for pattern in self._patterns:
            for match in pattern.finditer(text, overlapped=False):
                group = "id" if "id" in pattern.groupindex and match.group("id") is not None else 0
                start, end = match.span(group)
                if end > start and (self._check is None or self._check(text, start, end)):
                    found[(start, end)] = RecognizerResult(self.supported_entities[0], start, end, self._score)
        return list(found.values())


@functools.cache
def name_gazetteer() -> tuple[frozenset[str], frozenset[str]]:
    """First and last names of Faker's person providers for several locales (lower-cased)."""
    import importlib

    first: set[str] = set()
    last: set[str] = set()
    for locale in ("en_US", "en_GB", "en_IE", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT", "pt_PT", "pl_PL", "sv_SE"):
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for attr, into in (("first_names", first), ("first_names_male", first), ("first_names_female", first), ("last_names", last)):
            into.update(str(n).lower() for n in getattr(provider, attr, ()))
    return frozenset(first - AMBIGUOUS_FIRST - NOT_NAMES), frozenset(last - NOT_NAMES)


def _not_a_word(text: str, start: int, end: int) -> bool:
    """A cue's capitalised follower is a name unless its first token is a common word ("Patient Portal")."""
    return text[start:end].split()[0].lower().strip(".") not in NOT_NAMES


def _gazetteer_name(text: str, start: int, end: int) -> bool:
    """"First Last": the first token a known first name, the last a capitalised token that is no common word."""
    first, _ = name_gazetteer()
    tokens = text[start:end].split()
    return tokens[0].lower() in first and tokens[-1].lower().strip(".") not in NOT_NAMES


def _last_first(text: str, start: int, end: int) -> bool:
    """"Last, First": a known last name, a comma, a known first name."""
    first, last = name_gazetteer()
    surname, given = (t.strip(" ,") for t in text[start:end].split(",", 1))
    return surname.lower() in last and given.split()[0].lower() in first


def person_recognizers() -> list[EntityRecognizer]:
    return [
        # "Dr. Anna Weber", "Mrs O'Brien": the name after a title (the title stays).
        GroupRegexRecognizer("PERSON", [rf"\b{TITLES}\.?\s+(?P<id>(?:{PARTICLE}\s+){{0,2}}{FULL_NAME})"], score=0.85),
        # "patient Maria Gonzalez", "Name: John Smith", "account holder: Li Wei".
        GroupRegexRecognizer("PERSON", [rf"(?i:\b(?:{NAME_CUES}))\s*[:\-]?\s+(?P<id>{FULL_NAME})"], score=0.7, check=_not_a_word),
        # "John Smith", "John A. Smith", "Smith, John": a gazetteer first name and a capitalised surname.
        GroupRegexRecognizer("PERSON", [rf"(?<![\p{{L}}'])(?P<id>{NAME}\s+(?:\p{{Lu}}\.\s+)?(?:{PARTICLE}\s+){{0,2}}{NAME})"],
                             score=0.6, check=_gazetteer_name),
        GroupRegexRecognizer("PERSON", [rf"(?<![\p{{L}}'])(?P<id>{NAME},\s+{NAME})"], score=0.6, check=_last_first),
    ]


def date_recognizers() -> list[EntityRecognizer]:
    words = [
        rf"(?i:\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTHS}\.?,?\s+\d{{2,4}}\b)",  # 3 March 2021, 3rd of Mar 21
        rf"(?i:\b{MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b)",  # March 3, 2021
        rf"(?i:\b{MONTHS}\.?\s+\d{{4}}\b)",  # March 2021
        r"(?i:\b(?:dob|date\s+of\s+birth|born)\s*[:\-]?\s*)(?P<id>(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))\b",  # DOB: 19850304
    ]
    return [DateRecognizer(supported_entity="DATE"), GroupRegexRecognizer("DATE", words, score=0.7)]


def recognizers_for(entities: Iterable[str], regions: Iterable[str]) -> list[EntityRecognizer]:
    """One list of recognizers for the entity types asked for; ``regions`` pick phone and postal formats."""
    regions = tuple(regions)
    made: dict[str, list[EntityRecognizer]] = {
        "EMAIL": [OfflineEmailRecognizer(supported_entity="EMAIL")],
        "PHONE": [CandidatePhoneRecognizer(supported_entity="PHONE", supported_regions=regions), *fiction_phone_recognizers(regions)],
        "DATE": date_recognizers(),
        "POSTAL_CODE": [GroupRegexRecognizer("POSTAL_CODE", [p for r in regions for p in POSTAL_FORMATS.get(r, ())], score=0.6)],
        # Above a phone number's score after Presidio's context boost (0.4 + 0.35 for "number" nearby):
        # a number after "account number" is the account, whatever libphonenumber reads in its digits.
        "MRN": [GroupRegexRecognizer("MRN", [MRN_CUE + ID_VALUE], score=0.9)],
        "ACCOUNT": [GroupRegexRecognizer("ACCOUNT", [ACCOUNT_CUE + ID_VALUE], score=0.9)],
        # Both validate a checksum (IBAN: ISO 13616 mod 97; card: Luhn): a failing number is not reported.
        "IBAN": [IbanRecognizer(supported_entity="IBAN")],
        "CARD": [CreditCardRecognizer(supported_entity="CARD", patterns=[*CreditCardRecognizer.PATTERNS, MASTERCARD_2_SERIES])],
        "PERSON": person_recognizers(),
    }
    return [r for entity in entities for r in made[entity]]


@functools.cache
def analyzer(entities: tuple[str, ...], regions: tuple[str, ...]) -> AnalyzerEngine:
    """A Presidio analyzer for ``entities``, built once per process (the spaCy pipeline and regexes)."""
    _register_lemma_component()
    registry = RecognizerRegistry(recognizers=recognizers_for(entities, regions), supported_languages=["en"])
    engine = BlankEnglishEngine(models=[{"lang_code": "en", "model_name": "blank:en"}])
    engine.load()
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


