"""A synthetic chat corpus for the demo model, deterministic by seed.

Four kinds of conversation, in the Qwen3.5 chat format of :mod:`tests.fixtures.tiny`'s template:

* ``qa``: grounded question answering. A document of short facts about synthetic people, places,
  companies, events, orders, flights... (names, places and codes are made of random syllables, so
  there are far too many to memorise: the model has to COPY from the context), then a question
  whose answer is the exact span of the document. Distractor facts of the same relation about other
  entities force the model to bind the right subject. Some questions are unanswerable
  (:data:`NO_ANSWER`), some are compound ("where ... and when?" -> ``"SPAN1, on SPAN2"``), some
  come after an earlier question and answer.
* ``tool``: tool calls in the Qwen3.5 XML format. One to four tool specs of varied domains, with
  varied function names, parameter names, types and enums; a request whose arguments are copied
  (or derived: number words, enum spellings, languages, flags) from the request; the assistant's
  ``<tool_call>`` (sometimes two in parallel), the tool's result, and a short final answer that
  copies values from the result. Some requests need no tool.
* ``json``: extraction. A passage and a JSON schema (or a key list); the answer is the JSON object
  (``json.dumps`` style, keys in schema order) with values copied from the passage.
* ``chat``: short plain replies (greetings, thanks, who are you, repeat-after-me...).

An :class:`Example` holds the whole conversation; :func:`render` turns it into ``(text, trained)``
segments through the tokenizer's chat template: for each trained assistant turn, the prompt as the
template renders it at inference with ``enable_thinking=False`` (ending in the empty think block),
then the assistant's text and ``<|im_end|>`` (trained). Everything here is pure Python; only
:func:`render` / :func:`encode` need a tokenizer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

KINDS = ("qa", "tool", "json", "chat")
DEFAULT_MIX = {"qa": 0.40, "tool": 0.30, "json": 0.20, "chat": 0.10}
#: The reply to a question the document does not answer.
NO_ANSWER = "The text does not say."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GENERATION_PROMPT = IM_START + "assistant\n<think>\n\n</think>\n\n"


@dataclass
class Example:
    """One conversation. ``messages`` includes the assistant turns; ``train_turns`` are the indices
    of the assistant messages that carry loss; ``meta`` holds what the evaluation checks."""

    kind: str
    messages: list[dict]
    tools: list[dict] | None = None
    train_turns: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def prompt_messages(self, turn: int | None = None) -> list[dict]:
        """The messages before a trained assistant turn (default: the first one)."""
        return self.messages[: self.train_turns[0] if turn is None else turn]


# --------------------------------------------------------------------------------------------
# Entities: a large, combinatorial vocabulary
# --------------------------------------------------------------------------------------------

_ONSETS = ("b br c ch d dr f fr g gr h j k kl kr l m n p pl pr qu r s sh sl st t th tr v w z "
           "b d g k l m n p r s t v").split()
_VOWELS = "a e i o u a e i o u ai ea ie io ou ia ei au y".split()
_CODAS = "n r l s m x t k nd rk sh th ck ll ss".split()

_FIRST = """Alice Bruno Carmen Dmitri Esther Farid Grace Hiro Ines Jamal Kofi Lena Mateo Nadia
Omar Priya Quentin Rosa Sven Tariq Ursula Viktor Wanda Xavier Yara Zane Amara Boris Chloe Diego
Elif Felix Greta Hassan Ivy Jonas Keiko Liam Maya Nikolai Olga Pablo Rania Samir Tomas Uma Vera
Wei Yusuf Zoe Anika Ben Clara Daniel Emma Fatima Gabriel Hana Igor Julia Karim Lucia Marco Noor
Oscar Paula Rafael Sofia Theo Valentina Ana Joao Mei Ravi Sara Leo""".split()
_LAST = """Garcia Novak Okafor Tanaka Silva Berg Kowalski Haddad Larsen Moreau Rossi Schmidt
Ivanova Nakamura Mendez Fischer Dubois Costa Patel Kim Nguyen Olsen Weber Santos Yilmaz Ahmed
Lindqvist Moretti Jensen Castillo Bauer Sato Kaur Romero Petrov Hughes Ferreira Vogel Brandt""".split()
_CITIES = """Lisbon Oslo Lima Lagos Tokyo Paris Cairo Berlin Austin Seoul Perth Quito Porto Turin
Krakow Dakar Hanoi Bergen Denver Leeds Nairobi Osaka Bilbao Lyon Gdansk Tallinn Riga Valencia
Mumbai Manila Havana Dublin Geneva Zurich Munich Vienna Prague Athens Madrid Seville Naples
Toronto Calgary Boston Chicago Phoenix Sydney Auckland Santiago Bogota Accra Tunis Ankara Baku
Almaty Kyoto Busan Taipei Jakarta Hamburg Antwerp Utrecht Malmo Aarhus""".split()
_CITY_SUFFIX = "ton burg ville port holm stad field mouth ford haven dale bury wick grad polis vik a".split()
_CITY_PREFIX = ["Port", "San", "New", "North", "Lake", "Saint", "Fort", "Upper"]
_STREET_TYPES = ["Street", "Road", "Avenue", "Lane", "Square", "Way", "Boulevard"]
_STREET_PREFIX = ["Rua", "Via", "Calle", "Rue", "Avenida"]
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_JOBS = """nurse engineer teacher pilot baker lawyer architect chef dentist plumber pharmacist
journalist librarian carpenter electrician translator photographer accountant gardener
firefighter surgeon designer mechanic economist biologist astronomer violinist editor
veterinarian geologist""".split()
_COLORS = "red blue green black white yellow grey orange purple silver golden brown pink teal".split()
_MATERIALS = "ceramic wooden steel glass leather cotton copper bamboo marble wool plastic brass".split()
_OBJECTS = """lamp chair kettle backpack clock vase desk bicycle umbrella jacket teapot bookshelf
mirror rug notebook blender guitar camera helmet tent scarf bowl drone speaker printer""".split()
_ANIMALS = "cat dog parrot rabbit horse turtle hamster goat".split()
_EVENTS = """conference festival workshop board_meeting product_launch concert marathon book_fair
hackathon team_offsite charity_gala science_fair trade_show film_screening""".split()
_COMPANY_SUFFIX = """Labs Systems Foods Logistics Bank Studio Motors Health Energy Books Media Works
Robotics Textiles Airlines Pharma Games Analytics""".split()
_CUISINES = "italian japanese mexican indian thai french greek korean vietnamese lebanese".split()
_TOPIC_WORDS = """budget report launch plan dinner trip review draft invoice schedule update
meeting garden concert training results contract design feedback party photos""".split()
_NUM_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_LANGUAGES = [("French", "fr"), ("German", "de"), ("Spanish", "es"), ("Portuguese", "pt"),
              ("Japanese", "ja"), ("Italian", "it"), ("Dutch", "nl"), ("Korean", "ko"),
              ("English", "en"), ("Polish", "pl")]
_CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "BRL", "INR", "CAD", "SEK", "NOK", "AUD", "MXN"]
_CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy"]


class Ents:
    """Random entities from one ``random.Random``."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def coin(self, lo: int = 2, hi: int = 3) -> str:
        r = self.rng
        n = r.randint(lo, hi)
        parts = []
        for i in range(n):
            s = r.choice(_ONSETS) + r.choice(_VOWELS)
            if i == n - 1 or r.random() < 0.25:
                s += r.choice(_CODAS)
            parts.append(s)
        return "".join(parts).capitalize()

    def first(self) -> str:
        return self.rng.choice(_FIRST) if self.rng.random() < 0.45 else self.coin(2, 3)

    def last(self) -> str:
        return self.rng.choice(_LAST) if self.rng.random() < 0.35 else self.coin(2, 3)

    def person(self) -> str:
        return f"{self.first()} {self.last()}"

    def people(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            p = self.person()
            if all(p.split()[0] != q.split()[0] and p.split()[1] != q.split()[1] for q in out):
                out.append(p)
        return out

    def city(self) -> str:
        r = self.rng
        x = r.random()
        if x < 0.4:
            return r.choice(_CITIES)
        if x < 0.85:
            return self.coin(1, 2) + r.choice(_CITY_SUFFIX)
        return f"{r.choice(_CITY_PREFIX)} {self.coin(1, 2)}"

    def cities(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            c = self.city()
            if c not in out:
                out.append(c)
        return out

    def street(self) -> str:
        r = self.rng
        if r.random() < 0.5:
            return f"{r.choice(_STREET_PREFIX)} {self.coin(2, 3)} {r.randint(1, 250)}"
        return f"{r.randint(1, 250)} {self.coin(2, 3)} {r.choice(_STREET_TYPES)}"

    def company(self) -> str:
        r = self.rng
        if r.random() < 0.7:
            return f"{self.coin(2, 3)} {r.choice(_COMPANY_SUFFIX)}"
        return f"{self.coin(2, 3)}{r.choice(['', ' & Co', ' Group', ' Inc'])}"

    def date(self, style: int | None = None) -> str:
        r = self.rng
        d, m, y = r.randint(1, 28), r.randint(1, 12), r.randint(1990, 2035)
        style = r.randrange(5) if style is None else style
        if style == 0:
            return f"{d} {_MONTHS[m - 1]} {y}"
        if style == 1:
            return f"{_MONTHS[m - 1]} {d}, {y}"
        if style == 2:
            return f"{y}-{m:02d}-{d:02d}"
        if style == 3:
            return f"{d} {_MONTHS[m - 1]}"
        return f"{r.choice(_WEEKDAYS)} {d} {_MONTHS[m - 1]}"

    def time(self) -> str:
        r = self.rng
        h, m = r.randint(0, 23), r.choice([0, 0, 15, 30, 45, r.randint(0, 59)])
        if r.random() < 0.7:
            return f"{h:02d}:{m:02d}"
        h12 = h % 12 or 12
        return f"{h12}:{m:02d} {'am' if h < 12 else 'pm'}" if m else f"{h12} {'am' if h < 12 else 'pm'}"

    def year(self) -> str:
        return str(self.rng.randint(1850, 2030))

    def int_text(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        return f"{n:,}" if n >= 10000 and self.rng.random() < 0.5 else str(n)

    def price(self) -> str:
        r = self.rng
        amount = r.choice([r.randint(1, 99), r.randint(10, 2000), round(r.uniform(1, 500), 2)])
        text = f"{amount:.2f}" if isinstance(amount, float) else str(amount)
        sym = r.choice(["$", "€", "£", ""])
        return f"{sym}{text}" if sym else f"{text} {r.choice(['dollars', 'euros', 'EUR', 'USD'])}"

    def item(self) -> str:
        r = self.rng
        parts = [r.choice(_COLORS)] if r.random() < 0.8 else []
        if r.random() < 0.6:
            parts.append(r.choice(_MATERIALS))
        parts.append(r.choice(_OBJECTS))
        return " ".join(parts)

    def code(self) -> str:
        r = self.rng
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        style = r.randrange(4)
        if style == 0:
            return f"{r.choice(letters)}{r.choice(letters)}-{r.randint(1000, 99999)}"
        if style == 1:
            return f"#{r.randint(10000, 999999)}"
        if style == 2:
            return f"{''.join(r.choice(letters) for _ in range(3))}{r.randint(10, 999)}"
        return f"{r.choice(letters)}{r.randint(100, 9999)}{r.choice(letters)}"

    def email(self, person: str | None = None) -> str:
        r = self.rng
        if person is None:
            person = self.person()
        first, last = person.lower().split()[:2]
        user = r.choice([f"{first}.{last}", f"{first[0]}{last}", first, f"{first}{r.randint(1, 99)}"])
        domain = self.coin(1, 2).lower() + r.choice([".com", ".org", ".net", ".io", ".co"])
        return f"{user}@{domain}"

    def phone(self) -> str:
        r = self.rng
        return r.choice([
            f"+{r.randint(1, 99)} {r.randint(100, 999)} {r.randint(100, 999)} {r.randint(1000, 9999)}",
            f"{r.randint(100, 999)}-{r.randint(100, 999)}-{r.randint(1000, 9999)}",
            f"0{r.randint(10, 99)} {r.randint(1000, 9999)} {r.randint(1000, 9999)}",
        ])

    def job(self) -> str:
        return self.rng.choice(_JOBS)

    def event(self) -> str:
        return self.rng.choice(_EVENTS).replace("_", " ")

    def flight(self) -> str:
        r = self.rng
        letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
        return f"{r.choice(letters)}{r.choice(letters)}{r.randint(10, 9999)}"

    def phrase(self, lo: int = 2, hi: int = 5) -> str:
        r = self.rng
        words = [r.choice(_TOPIC_WORDS + ["the", "new", "final", "our", "next", "big"])
                 for _ in range(r.randint(lo, hi))]
        return " ".join(words)

    def sentence(self) -> str:
        r = self.rng
        return r.choice([
            f"see you at {self.time()}",
            f"the {r.choice(_TOPIC_WORDS)} is ready",
            f"please review the {r.choice(_TOPIC_WORDS)} before {r.choice(_WEEKDAYS)}",
            f"running {r.randint(5, 40)} minutes late",
            f"call me about the {r.choice(_TOPIC_WORDS)}",
            f"thanks for the {r.choice(_TOPIC_WORDS)}",
            f"the {r.choice(_TOPIC_WORDS)} moved to {self.city()}",
            f"bring the {self.item()}",
        ])


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


# --------------------------------------------------------------------------------------------
# (a) Grounded QA
# --------------------------------------------------------------------------------------------


@dataclass
class _Fact:
    text: str
    questions: list[tuple[list[str], str]]  # (question phrasings, exact answer span)
    key: str  # subject|relation, for unanswerable questions
    compound: tuple[list[str], str] | None = None


def _person_facts(e: Ents, p: str) -> list[_Fact]:
    r = e.rng
    first = p.split()[0]
    facts = []
    city = e.city()
    facts.append(_Fact(r.choice([f"{p} lives in {city}.", f"{p} is based in {city}.",
                                 f"{p} moved to {city} last year."]),
                       [([f"Where does {first} live?", f"Which city is {first} based in?",
                          f"In which city does {p} live?"], city)], f"{p}|city"))
    date = e.date(r.choice([0, 1, 2]))
    facts.append(_Fact(f"{p} was born on {date}.",
                       [([f"When was {first} born?", f"What is {p}'s date of birth?"], date)],
                       f"{p}|born"))
    job = e.job()
    facts.append(_Fact(r.choice([f"{p} works as {_a(job)}.", f"{p} is {_a(job)}."]),
                       [([f"What does {first} do for a living?", f"What is {p}'s job?"], job)],
                       f"{p}|job"))
    company = e.company()
    facts.append(_Fact(r.choice([f"{p} works at {company}.", f"{p} is employed by {company}."]),
                       [([f"Which company does {first} work for?", f"Who employs {p}?"], company)],
                       f"{p}|employer"))
    age = str(r.randint(18, 95))
    facts.append(_Fact(f"{p} is {age} years old.", [([f"How old is {first}?"], age)], f"{p}|age"))
    phone = e.phone()
    facts.append(_Fact(r.choice([f"{p}'s phone number is {phone}.", f"You can call {first} on {phone}."]),
                       [([f"What is {p}'s phone number?", f"What number can I call {first} on?"],
                         phone)], f"{p}|phone"))
    email = e.email(p)
    facts.append(_Fact(r.choice([f"{p}'s email address is {email}.", f"You can reach {first} at {email}."]),
                       [([f"What is {first}'s email address?", f"How can I email {p}?"], email)],
                       f"{p}|email"))
    item, price = e.item(), e.price()
    facts.append(_Fact(f"{p} bought {_a(item)} for {price}.",
                       [([f"What did {first} buy?", f"What did {p} purchase?"], item),
                        ([f"How much did {first} pay for the {item}?"], price)], f"{p}|bought"))
    code = e.code()
    facts.append(_Fact(r.choice([f"{p}'s order number is {code}.",
                                 f"The order placed by {p} has the reference {code}."]),
                       [([f"What is {first}'s order number?", f"What is the reference of {p}'s order?"],
                         code)], f"{p}|order"))
    animal, pet = r.choice(_ANIMALS), e.coin(1, 2)
    facts.append(_Fact(f"{p} has {_a(animal)} named {pet}.",
                       [([f"What is the name of {first}'s {animal}?", f"What is {p}'s {animal} called?"],
                         pet)], f"{p}|pet"))
    return facts


def _world_facts(e: Ents, people: list[str]) -> list[_Fact]:
    r = e.rng
    facts = []
    if len(people) >= 2:
        p, q = r.sample(people, 2)
        day, t = r.choice(_WEEKDAYS), e.time()
        when = f"{day} at {t}"
        facts.append(_Fact(f"{p} meets {q} on {when}.",
                           [([f"When does {p.split()[0]} meet {q.split()[0]}?"], when),
                            ([f"Who does {p} meet on {day}?"], q)], f"{p}|meets"))
    c = e.company()
    year, n, hq = e.year(), e.int_text(5, 90000), e.city()
    facts.append(_Fact(f"{c} was founded in {year}.",
                       [([f"When was {c} founded?", f"In which year was {c} founded?"], year)],
                       f"{c}|founded"))
    facts.append(_Fact(f"{c} has {n} employees.",
                       [([f"How many employees does {c} have?", f"How many people work at {c}?"], n)],
                       f"{c}|employees"))
    facts.append(_Fact(r.choice([f"{c} is headquartered in {hq}.", f"The headquarters of {c} are in {hq}."]),
                       [([f"Where is {c} headquartered?", f"Where are the headquarters of {c}?"], hq)],
                       f"{c}|hq"))
    ev, ecity, edate = e.event(), e.city(), e.date()
    facts.append(_Fact(r.choice([f"The {ev} will take place in {ecity} on {edate}.",
                                 f"The {ev} is held in {ecity} on {edate}."]),
                       [([f"Where will the {ev} take place?", f"Where is the {ev}?"], ecity),
                        ([f"When is the {ev}?", f"On what date is the {ev}?"], edate)],
                       f"{ev}|event",
                       compound=([f"Where and when is the {ev}?"], f"{ecity}, on {edate}")))
    ocity, street, odate = e.city(), e.street(), e.date(r.choice([0, 3, 4]))
    facts.append(_Fact(r.choice([f"The {ocity} office moves to {street} on {odate}.",
                                 f"On {odate}, the {ocity} office moves to {street}."]),
                       [([f"Where does the {ocity} office move?", f"What is the new address of the "
                          f"{ocity} office?"], street),
                        ([f"When does the {ocity} office move?"], odate)],
                       f"{ocity}|office",
                       compound=([f"Where does the {ocity} office move, and when?"],
                                 f"{street}, on {odate}")))
    item, price = e.item(), e.price()
    facts.append(_Fact(r.choice([f"The {item} costs {price}.", f"A {item} sells for {price}."]),
                       [([f"How much does the {item} cost?", f"What is the price of the {item}?"], price)],
                       f"{item}|price"))
    fl, c1, c2, t1, t2 = e.flight(), *e.cities(2), e.time(), e.time()
    facts.append(_Fact(f"Flight {fl} leaves {c1} at {t1} and lands in {c2} at {t2}.",
                       [([f"When does flight {fl} leave?", f"What time does flight {fl} depart?"], t1),
                        ([f"Where does flight {fl} land?", f"What is the destination of flight {fl}?"], c2),
                        ([f"Where does flight {fl} leave from?"], c1),
                        ([f"What time does flight {fl} land?"], t2)], f"{fl}|flight"))
    return facts


_QA_SYSTEMS = ["You are a helpful assistant.", "Answer concisely.", "You are a helpful assistant. "
               "Answer with the exact words of the text.", "Be brief."]


def _qa_prompt(e: Ents, facts: list[_Fact], question: str) -> list[dict]:
    r = e.rng
    sentences = [f.text for f in facts]
    style = r.randrange(3)
    if style == 0:
        doc = " ".join(sentences)
    elif style == 1:
        doc = "\n".join(f"- {s}" for s in sentences)
    else:
        doc = "\n".join(sentences)
    if r.random() < 0.25:
        lead = r.choice(["Internal memo: ", "Notes: ", "Meeting notes.\n", "Update: "])
        doc = (lead.strip() + "\n" if style else lead) + doc
    fmt = r.randrange(5)
    if fmt == 0:
        return [{"role": "system", "content": "Answer from the document only.\n\n" + doc},
                {"role": "user", "content": question}]
    if fmt == 1:
        return [{"role": "system", "content": r.choice(["Use the following facts to answer.\n",
                                                        "Document:\n", "Context:\n"]) + doc},
                {"role": "user", "content": question}]
    if fmt == 2:
        lead = r.choice(["Context:\n", "Read the text and answer the question.\n\n", "", "Text:\n"])
        q = r.choice(["Question: ", "Q: ", ""]) + question
        msgs = [{"role": "user", "content": f"{lead}{doc}\n\n{q}"}]
        if r.random() < 0.5:
            msgs.insert(0, {"role": "system", "content": r.choice(_QA_SYSTEMS)})
        return msgs
    if fmt == 3:
        return [{"role": "user", "content": f"{question}\n\n{doc}"}]
    return [{"role": "system", "content": r.choice(_QA_SYSTEMS)},
            {"role": "user", "content": f"Here is a document:\n{doc}\n\n{question}"}]


def gen_qa(rng: random.Random) -> Example:
    e = Ents(rng)
    people = e.people(rng.randint(2, 4))
    pool = [f for p in people for f in _person_facts(e, p)] + _world_facts(e, people)
    rng.shuffle(pool)
    n_ctx = rng.randint(4, 10)
    ctx = pool[:n_ctx]
    absent = pool[n_ctx:]
    turns: list[tuple[str, str]] = []
    meta: dict[str, Any] = {}
    n_q = 2 if rng.random() < 0.15 else 1
    for _ in range(n_q):
        x = rng.random()
        if x < 0.06 and absent:
            f = rng.choice(absent)
            phrasings, _ = rng.choice(f.questions)
            q, a = rng.choice(phrasings), NO_ANSWER
            kind = "unanswerable"
        elif x < 0.18 and any(f.compound for f in ctx):
            f = rng.choice([f for f in ctx if f.compound])
            q, a = rng.choice(f.compound[0]), f.compound[1]
            kind = "compound"
        else:
            f = rng.choice(ctx)
            phrasings, a = rng.choice(f.questions)
            q = rng.choice(phrasings)
            kind = "span"
        turns.append((q, a))
        meta = {"answer": a, "question": q, "type": kind}
    messages = _qa_prompt(e, ctx, turns[0][0])
    messages.append({"role": "assistant", "content": turns[0][1]})
    for q, a in turns[1:]:
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    meta["context"] = "\n".join(m["content"] for m in messages if m["role"] in ("system", "user"))
    return Example("qa", messages, None, [len(messages) - 1], meta)


# --------------------------------------------------------------------------------------------
# (b) Tool calls
# --------------------------------------------------------------------------------------------


@dataclass
class _Param:
    names: list[str]
    type: str  # string | integer | number | boolean
    gen: Callable[[Ents], tuple[Any, str]]  # -> (argument value, text in the request)
    phrases: list[str]  # "{v}" is the request text
    desc: str
    enum: list[str] | None = None


def _p_str(fn: Callable[[Ents], str]) -> Callable[[Ents], tuple[Any, str]]:
    def gen(e: Ents) -> tuple[Any, str]:
        v = fn(e)
        return v, v

    return gen


def _p_int(lo: int, hi: int, words: bool = True) -> Callable[[Ents], tuple[Any, str]]:
    def gen(e: Ents) -> tuple[Any, str]:
        n = e.rng.randint(lo, hi)
        if words and n < len(_NUM_WORDS) and e.rng.random() < 0.35:
            return n, _NUM_WORDS[n]
        return n, str(n)

    return gen


def _p_amount(e: Ents) -> tuple[Any, str]:
    r = e.rng
    if r.random() < 0.5:
        n = r.randint(1, 5000)
        return n, str(n)
    x = round(r.uniform(1, 2000), 2)
    return x, f"{x:.2f}" if r.random() < 0.5 else str(x)


def _p_enum(values: list[str], spell: Callable[[random.Random, str], str] | None = None):
    def gen(e: Ents) -> tuple[Any, str]:
        v = e.rng.choice(values)
        return v, spell(e.rng, v) if spell else v

    return gen


def _cap_spell(r: random.Random, v: str) -> str:
    return r.choice([v, v.capitalize(), v.upper()]) if len(v) > 2 else v


def _currency_gen(e: Ents) -> tuple[Any, str]:
    v = e.rng.choice(_CURRENCIES)
    return v, v


def _language_gen(e: Ents) -> tuple[Any, str]:
    name, code = e.rng.choice(_LANGUAGES)
    return code, name


def _bool(true_phrases: list[str], false_phrases: list[str]):
    """A boolean flag: the request says one of the phrases (no '{v}')."""

    def gen(e: Ents) -> tuple[Any, str]:
        v = e.rng.random() < 0.6
        return v, e.rng.choice(true_phrases if v else false_phrases)

    return gen


P = _Param
PARAMS: dict[str, _Param] = {
    "city": P(["city", "location", "city_name", "place"], "string", _p_str(Ents.city),
              ["in {v}", "for {v}"], "The city name"),
    "origin": P(["origin", "from_city", "departure_city", "source"], "string", _p_str(Ents.city),
                ["from {v}"], "Where the trip starts"),
    "destination": P(["destination", "to_city", "arrival_city", "dest"], "string", _p_str(Ents.city),
                     ["to {v}"], "Where the trip ends"),
    "date": P(["date", "day", "on_date", "start_date", "when"], "string", _p_str(Ents.date),
              ["on {v}"], "The date"),
    "time": P(["time", "at_time", "start_time", "hour"], "string", _p_str(Ents.time), ["at {v}"],
              "The time of day"),
    "person": P(["name", "person", "contact", "recipient", "user_name"], "string", _p_str(Ents.person),
                ["to {v}", "for {v}"], "Full name of the person"),
    "email": P(["email", "to", "recipient_email", "address"], "string", _p_str(Ents.email),
               ["to {v}"], "Email address"),
    "query": P(["query", "q", "search_terms", "keywords"], "string", _p_str(Ents.phrase),
               ['for "{v}"', "for {v}"], "What to search for"),
    "limit": P(["limit", "max_results", "count", "n", "top_k"], "integer", _p_int(1, 20),
               ["and show {v} results", "(top {v})", "limit {v}"], "How many results"),
    "guests": P(["guests", "people", "party_size", "num_guests"], "integer", _p_int(1, 12),
                ["for {v} people", "for {v} guests"], "Number of guests"),
    "nights": P(["nights", "num_nights", "stay_length"], "integer", _p_int(1, 14),
                ["for {v} nights"], "Number of nights"),
    "passengers": P(["passengers", "seats", "num_passengers", "travellers"], "integer", _p_int(1, 9),
                    ["for {v} passengers", "with {v} seats"], "Number of passengers"),
    "days": P(["days", "num_days", "horizon"], "integer", _p_int(1, 10),
              ["for the next {v} days", "over {v} days"], "How many days ahead"),
    "amount": P(["amount", "value", "sum", "quantity"], "number", _p_amount, ["{v}"],
                "The amount to convert"),
    "unit": P(["unit", "units", "temperature_unit", "scale"], "string",
              _p_enum(["celsius", "fahrenheit"], _cap_spell), ["in {v}"], "Temperature unit",
              ["celsius", "fahrenheit"]),
    "from_currency": P(["from_currency", "source_currency", "base", "from"], "string", _currency_gen,
                       ["{v}"], "Currency code to convert from", None),
    "to_currency": P(["to_currency", "target_currency", "quote", "to"], "string", _currency_gen,
                     ["to {v}", "into {v}", "in {v}"], "Currency code to convert to", None),
    "priority": P(["priority", "level", "importance"], "string",
                  _p_enum(["low", "normal", "high", "urgent"]), ["with {v} priority"], "Priority",
                  ["low", "normal", "high", "urgent"]),
    "language": P(["target_language", "language", "lang", "to_lang"], "string", _language_gen,
                  ["into {v}", "to {v}"], "ISO 639-1 language code",
                  [code for _, code in _LANGUAGES]),
    "mode": P(["mode", "travel_mode", "by"], "string",
              _p_enum(["walking", "driving", "transit", "cycling"]), ["by {v}", "{v}"],
              "How to travel", ["walking", "driving", "transit", "cycling"]),
    "cuisine": P(["cuisine", "food_type", "kind"], "string", _p_enum(_CUISINES), ["serving {v} food"],
                 "Type of food", _CUISINES),
    "message": P(["message", "body", "text", "content", "note"], "string", _p_str(Ents.sentence),
                 ['saying "{v}"', 'with the message "{v}"', 'that says "{v}"'], "The message text"),
    "subject": P(["subject", "title", "topic"], "string", _p_str(Ents.phrase),
                 ['with the subject "{v}"', 'titled "{v}"'], "The subject line"),
    "order_id": P(["order_id", "order_number", "id", "reference"], "string", _p_str(Ents.code),
                  ["{v}"], "The order identifier"),
    "tracking": P(["tracking_number", "tracking_id", "parcel_id"], "string", _p_str(Ents.code),
                  ["{v}"], "The tracking number"),
    "ticker": P(["ticker", "symbol", "stock"], "string",
                _p_str(lambda e: "".join(e.rng.choice("ABCDEFGHIKLMNOPRSTUVWXYZ")
                                         for _ in range(e.rng.randint(2, 4)))),
                ["{v}"], "Stock ticker symbol"),
    "restaurant": P(["restaurant", "venue", "place_name"], "string",
                    _p_str(lambda e: e.rng.choice(["Cafe ", "Casa ", "Chez ", "The "]) + e.coin(2, 3)),
                    ["at {v}"], "Name of the restaurant"),
    "duration": P(["duration_minutes", "minutes", "duration", "length"], "integer", _p_int(5, 180, False),
                  ["for {v} minutes", "lasting {v} minutes"], "Length in minutes"),
    "artist": P(["artist", "by_artist", "performer"], "string", _p_str(Ents.person), ["by {v}"],
                "The artist"),
    "notify": P(["notify", "send_notification", "alert"], "boolean",
                _bool(["and notify me", "and send me a notification"],
                      ["without notifying anyone", "but do not notify me"]), ["{v}"],
                "Whether to send a notification"),
    "urgent": P(["urgent", "is_urgent", "high_priority"], "boolean",
                _bool(["and mark it urgent", "as urgent"], ["it is not urgent", "no rush"]), ["{v}"],
                "Mark as urgent"),
    "refund": P(["refund", "issue_refund", "with_refund"], "boolean",
                _bool(["and refund me", "with a refund"], ["without a refund", "no refund needed"]),
                ["{v}"], "Whether to refund"),
    "label": P(["label", "name", "tag"], "string", _p_str(Ents.phrase), ['labelled "{v}"', 'called "{v}"'],
               "A label"),
    "text": P(["text", "source_text", "content"], "string", _p_str(Ents.sentence), ['"{v}"'],
              "The text to translate"),
    "recipient": P(["recipient", "contact", "to", "person"], "string", _p_str(Ents.person), ["to {v}"],
                   "Full name of the contact"),
    "reminder": P(["text", "message", "title", "what"], "string", _p_str(Ents.sentence),
                  ['to "{v}"', 'about "{v}"'], "What to be reminded of"),
    "user_email": P(["email", "user_email", "address"], "string", _p_str(Ents.email),
                    ["{v}", "with the email {v}"], "The user's email address"),
    "song": P(["title", "song", "track", "query"], "string", _p_str(lambda e: e.phrase(2, 3).title()),
              ['"{v}"', "{v}"], "Song title"),
}


@dataclass
class _Domain:
    names: list[str]  # function name variants
    desc: str
    action: list[str]  # how a request asks for it
    required: list[str]  # PARAMS keys, in the order they appear in the request
    optional: list[str]
    result: Callable[[Ents, dict], dict]
    answer: Callable[[dict, dict, random.Random], str]
    info: bool = True  # a lookup (parallel calls allowed) or an action


def _weather_result(e: Ents, a: dict) -> dict:
    unit = a.get("unit", "celsius")
    t = e.rng.randint(-10, 38) if unit == "celsius" else e.rng.randint(14, 100)
    return {"temperature": t, "condition": e.rng.choice(_CONDITIONS), "humidity": e.rng.randint(10, 99)}


DOMAINS: list[_Domain] = [
    _Domain(["get_weather", "current_weather", "weather_lookup", "getWeather", "fetch_weather"],
            "Get the current weather for a city.", ["check the weather", "get the weather",
                                                   "tell me the weather"], ["city"], ["unit"],
            _weather_result,
            lambda a, res, r: r.choice([
                f"It is {res['temperature']} degrees and {res['condition']} in {a['city']}.",
                f"In {a['city']} it is {res['condition']}, {res['temperature']} degrees, with "
                f"{res['humidity']}% humidity."])),
    _Domain(["get_forecast", "weather_forecast", "forecast", "getForecast"],
            "Get the weather forecast for the next days.", ["get the forecast", "check the forecast"],
            ["city"], ["days", "unit"],
            lambda e, a: {"high": e.rng.randint(0, 35), "low": e.rng.randint(-15, 15),
                          "summary": e.rng.choice(_CONDITIONS)},
            lambda a, res, r: f"The forecast for {a['city']}: {res['summary']}, highs of "
                              f"{res['high']} and lows of {res['low']}."),
    _Domain(["book_flight", "reserve_flight", "flight_booking", "bookFlight"],
            "Book a flight.", ["book a flight", "reserve a flight", "get me a flight"],
            ["origin", "destination", "date"], ["passengers"],
            lambda e, a: {"status": "confirmed", "booking_id": e.code(), "price": e.price()},
            lambda a, res, r: f"Your flight from {a['origin']} to {a['destination']} is booked. "
                              f"Booking {res['booking_id']}, price {res['price']}.", False),
    _Domain(["book_hotel", "reserve_room", "hotel_booking", "bookHotel"],
            "Book a hotel room.", ["book a hotel", "reserve a room"], ["city", "date"],
            ["nights", "guests"],
            lambda e, a: {"status": "confirmed", "hotel": "Hotel " + e.coin(2, 3),
                          "confirmation": e.code()},
            lambda a, res, r: f"Booked {res['hotel']} in {a['city']}, confirmation "
                              f"{res['confirmation']}.", False),
    _Domain(["book_table", "reserve_table", "restaurant_reservation", "bookTable"],
            "Reserve a table at a restaurant.", ["book a table", "reserve a table"],
            ["restaurant", "date", "time"], ["guests"],
            lambda e, a: {"status": "confirmed", "table": e.rng.randint(1, 40), "reference": e.code()},
            lambda a, res, r: f"Your table at {a['restaurant']} is reserved for {a['time']} "
                              f"(reference {res['reference']}).", False),
    _Domain(["send_email", "email_send", "compose_email", "sendEmail"],
            "Send an email.", ["send an email", "write an email"], ["email", "subject"],
            ["message"],
            lambda e, a: {"status": "sent", "message_id": e.code()},
            lambda a, res, r: r.choice([f"The email to {a['email']} has been sent.",
                                        f"Sent. Message id {res['message_id']}."]), False),
    _Domain(["send_message", "post_message", "text_contact", "sendMessage"],
            "Send a chat message to a contact.", ["send a message", "write a message"],
            ["recipient", "message"], ["urgent"],
            lambda e, a: {"status": "delivered", "at": e.time()},
            lambda a, res, r: f"Your message to {a['recipient']} was delivered at {res['at']}.", False),
    _Domain(["create_reminder", "add_reminder", "set_reminder", "remind"],
            "Create a reminder.", ["remind me", "set a reminder", "create a reminder"],
            ["reminder", "date", "time"], ["priority"],
            lambda e, a: {"status": "created", "reminder_id": e.code()},
            lambda a, res, r: f"Reminder set for {a['date']} at {a['time']}.", False),
    _Domain(["create_event", "add_calendar_event", "schedule_meeting", "createEvent"],
            "Add an event to the calendar.", ["schedule a meeting", "add an event", "put a meeting"],
            ["subject", "date", "time"], ["duration", "city"],
            lambda e, a: {"status": "scheduled", "event_id": e.code()},
            lambda a, res, r: f"Scheduled \"{a['subject']}\" on {a['date']} at {a['time']} "
                              f"(event {res['event_id']}).", False),
    _Domain(["convert_currency", "currency_convert", "fx_convert", "convertCurrency"],
            "Convert an amount between currencies.", ["convert", "change"],
            ["amount", "from_currency", "to_currency"], [],
            lambda e, a: {"result": round(e.rng.uniform(1, 9000), 2),
                          "rate": round(e.rng.uniform(0.01, 150), 4)},
            lambda a, res, r: f"{a['amount']} {a['from_currency']} is {res['result']} "
                              f"{a['to_currency']} (rate {res['rate']})."),
    _Domain(["search_web", "web_search", "search", "searchDocuments", "find_documents"],
            "Search for documents.", ["search", "look up", "find results"], ["query"], ["limit"],
            lambda e, a: {"results": [e.phrase(2, 4) for _ in range(e.rng.randint(1, 3))]},
            lambda a, res, r: "I found: " + "; ".join(res["results"]) + "."),
    _Domain(["get_stock_price", "stock_quote", "quote", "getStockPrice"],
            "Get the latest stock price.", ["get the stock price of", "check the price of",
                                            "look up the share price of"], ["ticker"], [],
            lambda e, a: {"price": round(e.rng.uniform(1, 900), 2),
                          "change": f"{e.rng.uniform(-9, 9):+.2f}%"},
            lambda a, res, r: f"{a['ticker']} trades at {res['price']} ({res['change']} today)."),
    _Domain(["track_package", "parcel_status", "track_shipment", "trackPackage"],
            "Track a parcel.", ["track my package", "where is my parcel", "track the shipment"],
            ["tracking"], [],
            lambda e, a: {"status": e.rng.choice(["in transit", "delivered", "out for delivery", "delayed"]),
                          "location": e.city()},
            lambda a, res, r: f"Your package is {res['status']}, last seen in {res['location']}."),
    _Domain(["cancel_order", "order_cancel", "cancelOrder", "void_order"],
            "Cancel an order.", ["cancel order", "cancel my order"], ["order_id"], ["refund", "notify"],
            lambda e, a: {"status": "cancelled", "refund_amount": e.price()},
            lambda a, res, r: f"Order {a['order_id']} has been cancelled.", False),
    _Domain(["translate_text", "translate", "translateText"],
            "Translate text into another language.", ["translate"], ["text", "language"], [],
            lambda e, a: {"translation": e.phrase(3, 6)},
            lambda a, res, r: f"The translation is: {res['translation']}"),
    _Domain(["lookup_user", "find_user", "get_user", "user_info"],
            "Look up a user by email.", ["look up the user", "find the account of", "get the user"],
            ["user_email"], [],
            lambda e, a: {"name": e.person(), "city": e.city(), "member_since": e.year()},
            lambda a, res, r: f"That is {res['name']} from {res['city']}, a member since "
                              f"{res['member_since']}."),
    _Domain(["set_alarm", "create_alarm", "alarm_set", "setAlarm"],
            "Set an alarm.", ["set an alarm", "wake me up"], ["time"], ["label"],
            lambda e, a: {"status": "set", "alarm_id": e.rng.randint(1, 99)},
            lambda a, res, r: f"Alarm set for {a['time']}.", False),
    _Domain(["find_restaurants", "restaurant_search", "search_restaurants", "findRestaurants"],
            "Find restaurants in a city.", ["find restaurants", "look for a place to eat"],
            ["city"], ["cuisine", "limit"],
            lambda e, a: {"restaurants": ["Cafe " + e.coin(2, 2), "Casa " + e.coin(2, 3)],
                          "rating": round(e.rng.uniform(3, 5), 1)},
            lambda a, res, r: f"Try {res['restaurants'][0]} or {res['restaurants'][1]} in {a['city']}."),
    _Domain(["add_task", "create_task", "todo_add", "addTask"],
            "Add a task to the to-do list.", ["add a task", "add to my to-do list", "create a task"],
            ["label"], ["date", "priority"],
            lambda e, a: {"status": "added", "task_id": e.code()},
            lambda a, res, r: f"Added \"{a['label']}\" to your list (task {res['task_id']}).", False),
    _Domain(["play_song", "play_music", "music_play", "playSong"],
            "Play a song.", ["play", "put on"], ["song"], ["artist"],
            lambda e, a: {"status": "playing", "track": e.phrase(2, 3).title()},
            lambda a, res, r: f"Now playing {res['track']}.", False),
    _Domain(["get_directions", "directions", "route_planner", "getDirections"],
            "Get directions between two places.", ["get directions", "find a route", "show me the way"],
            ["origin", "destination"], ["mode"],
            lambda e, a: {"distance_km": round(e.rng.uniform(0.5, 900), 1),
                          "duration_min": e.rng.randint(3, 900)},
            lambda a, res, r: f"From {a['origin']} to {a['destination']}: {res['distance_km']} km, "
                              f"about {res['duration_min']} minutes."),
]

_OPENERS = [("", "."), ("Please ", "."), ("Could you ", "?"), ("Can you ", "?"), ("I need you to ", "."),
            ("Hey, ", "."), ("Quick one: ", "."), ("I'd like you to ", ".")]


def _tool_spec(domain: _Domain, params: list[tuple[str, str]], required: list[str], name: str,
               r: random.Random) -> dict:
    props: dict[str, Any] = {}
    for key, pname in params:
        p = PARAMS[key]
        prop: dict[str, Any] = {"type": p.type}
        if r.random() < 0.7:
            prop["description"] = p.desc
        if p.enum and r.random() < 0.85:
            prop["enum"] = list(p.enum)
        props[pname] = prop
    return {"type": "function", "function": {
        "name": name, "description": domain.desc,
        "parameters": {"type": "object", "properties": props, "required": required}}}


def _coined_domain(e: Ents) -> _Domain:
    """A tool of no known domain: the request names it and its parameters explicitly."""
    r = e.rng
    keys = r.sample([k for k in PARAMS if PARAMS[k].type != "boolean"], r.randint(1, 3))
    verb = r.choice(["run", "compute", "fetch", "update", "check", "sync", "get", "make", "list"])
    noun = e.coin(1, 2).lower()
    return _Domain([f"{verb}_{noun}", f"{noun}_{verb}"], f"{verb.capitalize()} the {noun}.",
                   [f"use the {noun} tool to {verb}", f"{verb} the {noun}"], keys, [],
                   lambda e, a: {"status": "ok", "value": e.rng.randint(0, 9999)},
                   lambda a, res, r: f"Done: the result is {res['value']}.", False)


def _instantiate(e: Ents, domain: _Domain, coined: bool) -> dict:
    """Pick names and values: returns spec, call arguments, request text."""
    r = e.rng
    name = r.choice(domain.names)
    optional = [k for k in domain.optional if r.random() < 0.5]
    all_keys = domain.required + domain.optional
    # parameter names, unique within the tool
    pnames: dict[str, str] = {}
    for k in all_keys:
        options = [n for n in PARAMS[k].names if n not in pnames.values()]
        pnames[k] = r.choice(options) if options else f"{PARAMS[k].names[0]}_{len(pnames)}"
    spec_params = [(k, pnames[k]) for k in all_keys]
    spec = _tool_spec(domain, spec_params, [pnames[k] for k in domain.required], name, r)
    args: dict[str, Any] = {}
    semantic: dict[str, Any] = {}
    phrases = []
    for k in domain.required + optional:
        p = PARAMS[k]
        value, text = p.gen(e)
        if coined:
            phrase = f"{pnames[k]} {text}" if p.type != "boolean" else text
        else:
            phrase = r.choice(p.phrases).replace("{v}", text)
        phrases.append(phrase)
        semantic[k] = value
    for k in all_keys:  # arguments in spec order
        if k in semantic:
            args[pnames[k]] = semantic[k]
    opener, end = r.choice(_OPENERS)
    action = r.choice(domain.action)
    if coined and r.random() < 0.5:
        action = f"call {name} with"
        body = ", ".join(phrases)
    else:
        body = " ".join(phrases)
    text = f"{opener}{action} {body}".strip()
    text = text[0].upper() + text[1:] + end
    return {"name": name, "spec": spec, "args": args, "semantic": semantic, "request": text,
            "pnames": pnames}


def gen_tool(rng: random.Random) -> Example:
    e = Ents(rng)
    r = rng
    coined = r.random() < 0.15
    domain = _coined_domain(e) if coined else r.choice(DOMAINS)
    call = _instantiate(e, domain, coined)
    others = r.sample([d for d in DOMAINS if d is not domain], r.randint(0, 3))
    tools = [call["spec"]]
    for d in others:
        tools.append(_instantiate(e, d, False)["spec"])
    r.shuffle(tools)
    unique: list[dict] = []
    for t in tools:  # a coined name may collide with another tool's: keep the target's spec
        same = [u for u in unique if u["function"]["name"] == t["function"]["name"]]
        if not same:
            unique.append(t)
        elif t is call["spec"]:
            unique[unique.index(same[0])] = t
    tools = unique
    messages: list[dict] = []
    if r.random() < 0.3:
        messages.append({"role": "system", "content": r.choice(
            ["You are a helpful assistant.", "You are an assistant with tools. Use them when needed.",
             "Be concise."])})
    x = r.random()
    if x < 0.08:  # no tool needed
        q, a = _chat_pair(e)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return Example("tool", messages, tools, [len(messages) - 1],
                       {"calls": [], "reply": a, "request": q})
    calls = [call]
    if domain.info and not coined and len(domain.required) == 1 and x < 0.18:
        # two lookups in parallel: same tool, a second value of the one required parameter
        key = domain.required[0]
        value, text = PARAMS[key].gen(e)
        pname = call["pnames"][key]
        second = {"name": call["name"], "args": {**call["args"], pname: value},
                  "semantic": {**call["semantic"], key: value}}
        call["request"] = call["request"][:-1] + r.choice([f", and also for {text}", f" and {text}"]) \
            + call["request"][-1]
        calls.append(second)
    messages.append({"role": "user", "content": call["request"]})
    tool_calls = [{"type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
                  for c in calls]
    messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
    first_turn = len(messages) - 1
    answers = []
    for c in calls:
        if r.random() < 0.06:
            res = {"error": r.choice(["not found", "service unavailable", "invalid input",
                                      "permission denied", "timeout"])}
            answers.append(f"Sorry, that did not work: {res['error']}.")
        else:
            res = domain.result(e, c["semantic"])
            answers.append(domain.answer(c["semantic"], res, r))
        messages.append({"role": "tool", "content": json.dumps(res, ensure_ascii=False)})
    final = " ".join(answers)
    messages.append({"role": "assistant", "content": final})
    meta = {"calls": [{"name": c["name"], "arguments": c["args"]} for c in calls], "final": final,
            "request": call["request"]}
    # The final answer is trained half the time: its prompt (tool specs, call, result) is long.
    turns = [first_turn, len(messages) - 1] if r.random() < 0.5 else [first_turn]
    return Example("tool", messages, tools, turns, meta)


# --------------------------------------------------------------------------------------------
# (c) JSON extraction
# --------------------------------------------------------------------------------------------


@dataclass
class _Field:
    names: list[str]
    type: str
    value: Any
    text: str  # a sentence of the passage that holds the value


def _record(e: Ents) -> list[_Field]:
    r = e.rng
    kind = r.randrange(6)
    F = _Field
    if kind == 0:
        p, age, city, job = e.person(), r.randint(18, 90), e.city(), e.job()
        email = e.email(p)
        member = r.random() < 0.5
        return [
            F(["name", "full_name", "person"], "string", p, f"{p} is a {age}-year-old {job}"),
            F(["age", "age_years"], "integer", age, ""),
            F(["job", "occupation", "profession"], "string", job, ""),
            F(["city", "location", "home_city"], "string", city, f"who lives in {city}."),
            F(["email", "email_address", "contact"], "string", email, f"Contact: {email}."),
            F(["is_member", "member", "subscribed"], "boolean", member,
              "They are a member of the club." if member else "They are not a member of the club."),
        ]
    if kind == 1:
        p, item, qty, price, date, oid = e.person(), e.item(), r.randint(1, 20), e.price(), e.date(), e.code()
        return [
            F(["order_id", "order_number", "reference"], "string", oid, f"Order {oid}"),
            F(["customer", "customer_name", "buyer"], "string", p, f"was placed by {p} on {date}."),
            F(["date", "order_date", "placed_on"], "string", date, ""),
            F(["item", "product", "article"], "string", item, f"It contains {qty} x {item}"),
            F(["quantity", "qty", "count"], "integer", qty, ""),
            F(["price", "total", "amount"], "string", price, f"for a total of {price}."),
        ]
    if kind == 2:
        ev, city, date, t, n = e.event(), e.city(), e.date(), e.time(), r.randint(5, 5000)
        org = e.company()
        return [
            F(["event", "event_name", "title"], "string", ev, f"The {ev}"),
            F(["organizer", "host", "organised_by"], "string", org, f"organised by {org}"),
            F(["city", "venue_city", "location"], "string", city, f"takes place in {city}"),
            F(["date", "event_date", "day"], "string", date, f"on {date}"),
            F(["start_time", "time", "starts_at"], "string", t, f"starting at {t}."),
            F(["attendees", "expected_attendance", "guests"], "integer", n,
              f"About {n} people are expected."),
        ]
    if kind == 3:
        fl, c1, c2, t, date = e.flight(), *e.cities(2), e.time(), e.date()
        seat = f"{r.randint(1, 45)}{r.choice('ABCDEF')}"
        p = e.person()
        return [
            F(["passenger", "traveller", "name"], "string", p, f"Passenger {p}"),
            F(["flight", "flight_number", "flight_no"], "string", fl, f"is booked on flight {fl}"),
            F(["origin", "from", "departure_city"], "string", c1, f"from {c1}"),
            F(["destination", "to", "arrival_city"], "string", c2, f"to {c2}"),
            F(["date", "departure_date", "travel_date"], "string", date, f"on {date},"),
            F(["departure_time", "departs_at", "time"], "string", t, f"departing at {t}."),
            F(["seat", "seat_number"], "string", seat, f"The seat is {seat}."),
        ]
    if kind == 4:
        item, price, stock, sku = e.item(), e.price(), r.randint(0, 500), e.code()
        in_stock = stock > 0
        return [
            F(["product", "product_name", "name"], "string", item, f"The {item}"),
            F(["sku", "product_code", "code"], "string", sku, f"(code {sku})"),
            F(["price", "cost", "unit_price"], "string", price, f"sells for {price}."),
            F(["stock", "units_in_stock", "inventory"], "integer", stock, f"There are {stock} units left."),
            F(["in_stock", "available", "is_available"], "boolean", in_stock,
              "It is available." if in_stock else "It is sold out."),
        ]
    c, year, n, hq, ceo = e.company(), r.randint(1850, 2030), r.randint(2, 90000), e.city(), e.person()
    public = r.random() < 0.5
    return [
        F(["company", "company_name", "name"], "string", c, f"{c} was founded in {year}"),
        F(["founded", "founded_year", "year_founded"], "integer", year, ""),
        F(["headquarters", "hq", "hq_city"], "string", hq, f"and is headquartered in {hq}."),
        F(["employees", "employee_count", "staff"], "integer", n, f"It employs {n} people."),
        F(["ceo", "chief_executive", "leader"], "string", ceo, f"The CEO is {ceo}."),
        F(["is_public", "listed", "publicly_traded"], "boolean", public,
          "Its shares are listed on the stock exchange." if public else "It is privately held."),
    ]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def gen_json(rng: random.Random) -> Example:
    e = Ents(rng)
    r = rng
    fields = _record(e)
    passage = " ".join(f.text for f in fields if f.text)
    if r.random() < 0.3:
        passage = r.choice([e.sentence().capitalize() + ". ", f"Posted on {e.date()}. ",
                            "From the records: "]) + passage
    chosen = [f for f in fields if r.random() < 0.75] or fields[:2]
    if r.random() < 0.3:
        r.shuffle(chosen)
    camel = r.random() < 0.2
    obj: dict[str, Any] = {}
    props: dict[str, Any] = {}
    for f in chosen:
        name = r.choice(f.names)
        name = _camel(name) if camel else name
        if name in obj:
            continue
        obj[name] = f.value
        props[name] = {"type": f.type}
    schema = {"type": "object", "properties": props, "required": list(props)}
    style = r.randrange(4)
    schema_text = json.dumps(schema)
    if style == 0:
        messages = [{"role": "user", "content": "Extract the data from the text below as JSON matching "
                     f"this schema.\n\nSchema:\n{schema_text}\n\nText:\n{passage}"}]
    elif style == 1:
        messages = [{"role": "system", "content": "Reply with a single JSON object that follows the "
                     "schema."},
                    {"role": "user", "content": f"{passage}\n\nJSON schema: {schema_text}"}]
    elif style == 2:
        keys = ", ".join(obj)
        messages = [{"role": "user", "content": f"Return a JSON object with the keys {keys}.\n\n{passage}"}]
    else:
        messages = [{"role": "system", "content": "You extract structured data. Answer with JSON only."},
                    {"role": "user", "content": f"Text: {passage}\nSchema: {schema_text}"}]
    answer = json.dumps(obj, ensure_ascii=False)
    messages.append({"role": "assistant", "content": answer})
    return Example("json", messages, None, [len(messages) - 1],
                   {"object": obj, "schema": schema, "passage": passage})


# --------------------------------------------------------------------------------------------
# (d) Short plain replies
# --------------------------------------------------------------------------------------------

_CAPABILITIES = ("I am a small demo model running on flashmoe. I can answer questions about a text "
                 "you give me, call tools and extract JSON.")


def _chat_pair(e: Ents) -> tuple[str, str]:
    r = e.rng
    x = r.randrange(10)
    name = e.first()
    if x == 0:
        q = r.choice(["Hi!", "Hello", "Hey there", "Hi", "Good morning!", "Hello!", f"Hi, I'm {name}."])
        a = f"Hello {name}! How can I help you today?" if name in q else r.choice(
            ["Hello! How can I help you today?", "Hi! What can I do for you?"])
    elif x == 1:
        q = r.choice(["Thanks!", "Thank you", "Thanks a lot.", "Great, thanks!", "Perfect, thank you."])
        a = r.choice(["You're welcome!", "Happy to help!", "Anytime!"])
    elif x == 2:
        q = r.choice(["Who are you?", "What are you?", "What can you do?", "Introduce yourself."])
        a = _CAPABILITIES
    elif x == 3:
        q = r.choice(["Bye", "Goodbye!", "See you later.", "That's all for now."])
        a = r.choice(["Goodbye!", "Bye! Have a nice day.", "See you!"])
    elif x == 4:
        q = r.choice(["How are you?", "How are you doing?", "How's it going?"])
        a = "I'm doing well, thank you! How can I help?"
    elif x in (5, 6):
        phrase = r.choice([e.sentence(), e.person(), e.city(), e.code(), e.item(), e.phrase(2, 6)])
        q = r.choice([f"Repeat after me: {phrase}", f"Say \"{phrase}\"", f"Please repeat: {phrase}",
                      f"Echo this back: {phrase}"])
        a = phrase
    elif x == 7:
        q = r.choice([f"What is the capital of {e.coin(2, 3)}?", f"Who won the {e.event()} in {e.year()}?",
                      f"What is {e.person()}'s phone number?", f"When was {e.company()} founded?"])
        a = "I don't have that information. Share a text with it and I can answer from it."
    elif x == 8:
        q = r.choice(["What's your name?", "What is your name?", "Do you have a name?"])
        a = "I'm the flashmoe demo model."
    else:
        q = r.choice(["Can you help me?", "I have a question.", "Are you there?"])
        a = r.choice(["Of course! What do you need?", "Yes, I'm here. What would you like to know?"])
    return q, a


def gen_chat(rng: random.Random) -> Example:
    e = Ents(rng)
    messages: list[dict] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(_QA_SYSTEMS)})
    if rng.random() < 0.2:  # an earlier exchange
        q0, a0 = _chat_pair(e)
        messages += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
    q, a = _chat_pair(e)
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Example("chat", messages, None, [len(messages) - 1], {"reply": a})


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "qa": gen_qa, "tool": gen_tool, "json": gen_json, "chat": gen_chat}


def example(seed: int, index: int, kind: str | None = None,
            mix: dict[str, float] | None = None) -> Example:
    """Example ``index`` of the corpus of ``seed`` (independent of every other index)."""
    rng = random.Random(f"flashmoe-demo:{seed}:{index}")
    if kind is None:
        mix = mix or DEFAULT_MIX
        kinds = list(mix)
        kind = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
    if kind not in GENERATORS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return GENERATORS[kind](rng)


def examples(seed: int, n: int, kind: str | None = None, start: int = 0,
             mix: dict[str, float] | None = None) -> list[Example]:
    return [example(seed, i, kind, mix) for i in range(start, start + n)]


# --------------------------------------------------------------------------------------------
# Rendering through the chat template
# --------------------------------------------------------------------------------------------


def _template(tokenizer, messages: list[dict], tools, generation: bool) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": generation}
    if generation:
        kwargs["enable_thinking"] = False
    return tokenizer.apply_chat_template(messages, tools=tools, **kwargs)


def turn_text(tokenizer, ex: Example, turn: int) -> tuple[str, str]:
    """``(prompt, target)`` of assistant turn ``turn``: the prompt as rendered at inference
    (``add_generation_prompt=True, enable_thinking=False``) and the assistant's text as the template
    renders it, followed by ``<|im_end|>``."""
    msgs = ex.messages
    if msgs[turn]["role"] != "assistant":
        raise ValueError(f"message {turn} is not an assistant turn")
    prompt = _template(tokenizer, msgs[:turn], ex.tools, True)
    if not prompt.endswith(GENERATION_PROMPT):
        raise ValueError("the chat template's generation prompt is not the empty think block")
    head = prompt[: -len(GENERATION_PROMPT)] + IM_START + "assistant\n"
    full = _template(tokenizer, msgs[: turn + 1], ex.tools, False)
    if not (full.startswith(head) and full.endswith(IM_END + "\n")):
        raise ValueError("the chat template does not render the assistant turn as expected")
    return prompt, full[len(head): -len("\n")]


def render(tokenizer, ex: Example) -> list[list[tuple[str, bool]]]:
    """One training sequence per trained turn, each a list of ``(text, trained)`` segments."""
    return [[(p, False), (t, True)] for p, t in (turn_text(tokenizer, ex, i) for i in ex.train_turns)]


def encode(tokenizer, ex: Example, max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Token ids and loss mask (1 = trained) of each training sequence of ``ex``, the prompt and the
    target encoded separately (as at inference: prompt ids, then the generated ids). Sequences
    longer than ``max_len`` are dropped."""
    out = []
    for segments in render(tokenizer, ex):
        ids: list[int] = []
        mask: list[int] = []
        for text, trained in segments:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            mask += [int(trained)] * len(piece)
        if max_len is None or len(ids) <= max_len:
            out.append((ids, mask))
    return out


def corpus_texts(tokenizer, seed: int, n: int) -> Iterator[str]:
    """Rendered conversations, for training a tokenizer."""
    for ex in examples(seed, n):
        for segments in render(tokenizer, ex):
            yield "".join(t for t, _ in segments)


# --------------------------------------------------------------------------------------------
# Parsing model outputs (evaluation and tests)
# --------------------------------------------------------------------------------------------


def parse_xml_tool_calls(text: str) -> list[dict]:
    """Parse ``<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>...`` blocks into
    ``[{"name": NAME, "arguments": {P: value}}]``; a value that is valid JSON (numbers, booleans,
    objects) is decoded, else kept as text. Malformed blocks are skipped."""
    import re

    calls = []
    for block in re.findall(r"<tool_call>(.*?)</tool_call>", text, flags=re.S):
        m = re.search(r"<function=([^>\n]+)>(.*?)</function>", block, flags=re.S)
        if not m:
            continue
        args: dict[str, Any] = {}
        for pm in re.finditer(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", m.group(2), flags=re.S):
            raw = pm.group(2)
            try:
                value = json.loads(raw)
                if isinstance(value, str):  # a quoted string stays as written
                    value = raw
            except (json.JSONDecodeError, ValueError):
                value = raw
            args[pm.group(1).strip()] = value
        calls.append({"name": m.group(1).strip(), "arguments": args})
    return calls


def args_match(got: dict, want: dict) -> bool:
    """Arguments equal, numbers compared as numbers and text stripped."""
    if set(got) != set(want):
        return False
    for k, w in want.items():
        g = got[k]
        if isinstance(w, bool) or isinstance(g, bool):
            if g != w:
                return False
        elif isinstance(w, (int, float)) and isinstance(g, (int, float)):
            if abs(float(g) - float(w)) > 1e-9:
                return False
        elif str(g).strip() != str(w).strip():
            return False
    return True
