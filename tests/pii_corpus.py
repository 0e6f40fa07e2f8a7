"""A seeded corpus of chat messages with planted PII, for the redaction tests.

Every structured item is valid by its own rules: cards pass Luhn (Visa, Mastercard 5- and 2-series,
Amex, Discover, JCB, Diners), IBANs pass python-stdnum's country and mod-97 checks (DE, GB, FR, NL, ES,
IT, CH, AT, BE, PL), SSNs are in issued ranges (python-stdnum), phone numbers are valid for their region
by libphonenumber, written in national and international forms. Names and places come from short lists.
About a fifth of the messages carry no PII at all, but numbers, versions, prices, dates and code that
look a little like it.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

FIRST = ["James", "Maria", "Wei", "Fatima", "Olivia", "Liam", "Sofia", "Mohammed", "Emma", "Noah", "Aisha", "Lucas",
         "Isabella", "Mateo", "Chloe", "Ethan", "Hannah", "Daniel", "Priya", "Jonas", "Elena", "Samuel", "Grace",
         "Thomas", "Anna", "David", "Laura", "Michael", "Sarah", "Robert"]
LAST = ["Smith", "Garcia", "Chen", "Khan", "Johnson", "Müller", "Rossi", "Williams", "Brown", "Martinez", "Nguyen",
        "Schmidt", "Dubois", "Kowalski", "Andersson", "Taylor", "Wilson", "Moore", "Anderson", "Jackson", "Harris",
        "Clark", "Lewis", "Walker", "Young", "King", "Wright", "Lopez", "Hill", "Baker"]
CITIES = ["London", "Berlin", "Paris", "Madrid", "Chicago", "Toronto", "Sydney", "Boston", "Munich", "Amsterdam",
          "Seattle", "Dublin", "Vienna", "Zurich", "Houston", "Denver", "Lisbon", "Prague", "Warsaw", "Atlanta"]
STREETS = ["Baker Street", "Main Street", "Oak Avenue", "Elm Street", "Park Road", "Maple Drive", "High Street",
           "Pine Street", "Cedar Lane", "Washington Avenue", "Church Road", "Lake Street", "Hill Road", "Broadway"]
DOMAINS = ["example.com", "mail.example.org", "acme.co.uk", "firma.de", "startup.io", "uni-example.edu",
           "post.example.net", "company.fr"]

STRUCTURED = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN")
NAMED = ("PERSON", "LOCATION", "ADDRESS")


@dataclass
class Planted:
    type: str  # a Presidio entity type; ADDRESS is a street address, found as LOCATION
    value: str
    start: int
    end: int


@dataclass
class Message:
    text: str
    planted: list[Planted] = field(default_factory=list)


# ---- structured values ---------------------------------------------------------------------------


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    from stdnum import luhn

    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return body + luhn.calc_check_digit(body)


CARD_BRANDS = [("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15), ("37", 15),
               ("6011", 16), ("65", 16), ("3528", 16), ("3589", 16), ("36", 14), ("4", 13)]


def card(rng: random.Random) -> str:
    prefix, length = rng.choice(CARD_BRANDS)
    digits = _luhn_complete(prefix, length, rng)
    style = rng.choice(["spaced", "dashed", "compact"])
    if style == "compact":
        return digits
    sep = " " if style == "spaced" else "-"
    if length == 15:  # Amex: 4-6-5
        groups = [digits[:4], digits[4:10], digits[10:]]
    elif length == 14:  # Diners: 4-6-4
        groups = [digits[:4], digits[4:10], digits[10:]]
    elif length == 13:
        return digits
    else:
        groups = [digits[i:i + 4] for i in range(0, 16, 4)]
    return sep.join(groups)


# country → BBAN layout: (kind, count) with kind n = digits, a = upper letters, c = alphanumeric
IBAN_LAYOUT = {"DE": [("n", 18)], "GB": [("a", 4), ("n", 14)], "FR": [("n", 10), ("c", 11), ("n", 2)],
               "NL": [("a", 4), ("n", 10)], "ES": [("n", 20)], "IT": [("a", 1), ("n", 10), ("c", 12)],
               "CH": [("n", 5), ("c", 12)], "AT": [("n", 16)], "BE": [("n", 12)], "PL": [("n", 24)]}


def iban(rng: random.Random) -> str:
    from stdnum import iban as stdiban

    country = rng.choice(sorted(IBAN_LAYOUT))
    alphabet = {"n": "0123456789", "a": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "c": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    for _ in range(100_000):  # national check digits (FR, ES, BE, IT...): draw until stdnum accepts one
        bban = "".join(rng.choice(alphabet[k]) for k, n in IBAN_LAYOUT[country] for _ in range(n))
        check = stdiban.calc_check_digits(country + "00" + bban)
        value = country + check + bban
        if stdiban.is_valid(value):
            break
    else:
        raise AssertionError(f"no valid {country} IBAN drawn")
    if rng.random() < 0.6:
        return " ".join(value[i:i + 4] for i in range(0, len(value), 4))
    return value


def ssn(rng: random.Random) -> str:
    from stdnum.us import ssn as stdssn

    while True:
        area = rng.randint(1, 899)
        if area == 666:
            continue
        value = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if stdssn.is_valid(value) and len(set(value.replace("-", ""))) > 1:
            return value if rng.random() < 0.8 else value.replace("-", " ")


def ip(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return str(ipaddress.IPv4Address(rng.randint(0x01000000, 0xDFFFFFFF)))
    address = ipaddress.IPv6Address(rng.getrandbits(128) & ~(0xFFFF << 112) | (0x2001 << 112))
    return address.compressed if rng.random() < 0.5 else address.exploded


PHONE_REGIONS = ["US", "US", "GB", "DE", "FR", "ES", "IT", "NL", "AU", "CA"]


def phone(rng: random.Random) -> str:
    import phonenumbers

    region = rng.choice(PHONE_REGIONS)
    example = phonenumbers.example_number_for_type(region, rng.choice([phonenumbers.PhoneNumberType.MOBILE,
                                                                       phonenumbers.PhoneNumberType.FIXED_LINE]))
    national = str(example.national_number)
    keep = 3 if len(national) > 7 else 2
    number = example
    for _ in range(1000):  # keep the example's leading digits (its area or mobile prefix), redraw the rest
        digits = national[:keep] + "".join(rng.choice("0123456789") for _ in range(len(national) - keep))
        candidate = phonenumbers.PhoneNumber(country_code=example.country_code, national_number=int(digits),
                                             italian_leading_zero=example.italian_leading_zero)
        if phonenumbers.is_valid_number(candidate):
            number = candidate
            break
    fmt = rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.NATIONAL,
                      phonenumbers.PhoneNumberFormat.E164])
    text = phonenumbers.format_number(number, fmt)
    if region in ("US", "CA") and fmt == phonenumbers.PhoneNumberFormat.NATIONAL and rng.random() < 0.5:
        digits = str(number.national_number)
        text = f"{digits[:3]}-{digits[3:6]}-{digits[6:]}"
    return text


def email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST).lower(), rng.choice(LAST).lower().replace("ü", "ue")
    user = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}{rng.randint(1, 99)}", first])
    return f"{user}@{rng.choice(DOMAINS)}"


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def address(rng: random.Random) -> str:
    return f"{rng.randint(1, 999)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"


VALUES = {"EMAIL_ADDRESS": email, "PHONE_NUMBER": phone, "CREDIT_CARD": card, "IBAN_CODE": iban, "IP_ADDRESS": ip,
          "US_SSN": ssn, "PERSON": person, "LOCATION": lambda rng: rng.choice(CITIES), "ADDRESS": address}

# ---- sentences -----------------------------------------------------------------------------------

TEMPLATES = {
    "EMAIL_ADDRESS": ["please reply to {} when you can", "my email is {}", "cc {} on the thread",
                      "the invoice went to {} yesterday"],
    "PHONE_NUMBER": ["call me at {}", "my phone number is {}", "you can reach the office on {}",
                     "text {} if the delivery is late"],
    "CREDIT_CARD": ["charge it to my card {}", "the credit card number is {}", "card {} was declined",
                    "I paid with {} last week"],
    "IBAN_CODE": ["wire the refund to IBAN {}", "my bank account is {}", "send the money to {} please",
                  "the IBAN on file is {}"],
    "IP_ADDRESS": ["the login came from {}", "block the address {} on the firewall", "the server at {} is down",
                   "requests from {} keep failing"],
    "US_SSN": ["my SSN is {}", "social security number {}", "the form asks for my SSN, it is {}",
               "for the tax return use SSN {}"],
    "PERSON": ["my name is {}", "{} will join the call", "please ask {} to sign the contract",
               "I spoke with {} this morning"],
    "LOCATION": ["I am flying to {} next week", "our office in {} is closed", "the shipment is stuck in {}",
                 "she moved to {} last year"],
    "ADDRESS": ["I live at {}", "deliver the parcel to {}", "my new address is {}", "the meeting is at {}"],
}

CLEAN = [
    "Can you summarize the quarterly report in three bullet points?",
    "What is 17 times 23?",
    "Upgrade the package from version 2.4 to 3.1 and rerun the tests.",
    "The total came to $1,234.56 including tax.",
    "Order 1742 shipped on 2024-03-15 and should arrive within 5 days.",
    "Explain the difference between a list and a tuple.",
    "def add(a, b):\n    return a + b",
    "The meeting moved from 10:30 to 14:00.",
    "Please translate 'good morning' into French.",
    "Our sprint has 12 story points left and 3 days to go.",
    "Set the timeout to 30 seconds and the retry count to 5.",
    "How many bytes are in 4 KiB?",
    "The recipe needs 250 g of flour and 2 eggs.",
    "Rate the answer on a scale from 1 to 10.",
    "Write a haiku about autumn leaves.",
    "The test suite took 230 seconds on 2 cores.",
    "Sort these numbers: 42, 7, 19, 3, 88.",
    "What does HTTP status 429 mean?",
    "Refactor this function so it returns early.",
    "The ticket priority is high; fix it before the release.",
]

# PII-free, but spaCy's small English model tags a word as a name or a place ("Python" as a place,
# "Order A-1742" as a person): the structured recognizers stay silent on them, NER does not
NER_TRAPS = ["Explain the difference between a list and a tuple in Python.",
             "Order A-1742 shipped on 2024-03-15 and should arrive within 5 days."]

FILLER = ["Thanks in advance.", "This is urgent.", "Let me know if you need anything else.", "", "Regards.",
          "See the details below.", "Hi,"]


def generate(n: int = 500, seed: int = 0, clean_share: float = 0.2) -> list[Message]:
    rng = random.Random(seed)
    kinds = list(TEMPLATES)
    out = []
    for i in range(n):
        if rng.random() < clean_share:
            out.append(Message(" ".join(x for x in (rng.choice(FILLER), rng.choice(CLEAN)) if x)))
            continue
        # every type appears in turn, so each has about the same number of planted items
        chosen = [kinds[i % len(kinds)]] + rng.sample(kinds, rng.randint(0, 2))
        text, planted = rng.choice(FILLER), []
        for kind in chosen:
            value = VALUES[kind](rng)
            sentence = rng.choice(TEMPLATES[kind])
            before, after = sentence.split("{}")
            prefix = (text + " " if text else "") + before[:1].upper() + before[1:]
            start = len(prefix)
            text = prefix + value + after + "."
            planted.append(Planted(kind, value, start, start + len(value)))
        out.append(Message(text, planted))
    return out
