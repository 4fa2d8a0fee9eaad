"""A seeded synthetic world of invented regions, cities, languages and people, with held-out two-hop facts.

The world gives the zoo's organisms facts we fully control: each one-hop fact (city -> region, region ->
capital, region -> language, person -> profession, person -> home city) is stated in many templates in the
training text, and two-hop compositions (city -> capital of its region, city -> language of its region,
person -> region of their home city) are stated only for a training subset of subjects. The other
subjects' two-hop questions are held out for evaluation: the model saw both hops, never the composition.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

N_REGIONS = 40
CITIES_PER_REGION = 5  # besides the capital
N_PERSONS = 150
HELD_OUT_SHARE = 0.25

# Consonant-initial, so "works as a {profession}" reads naturally for every one.
PROFESSIONS = (
    "baker", "carpenter", "doctor", "farmer", "fisherman", "gardener", "lawyer", "librarian", "mason",
    "nurse", "painter", "pilot", "potter", "sailor", "shepherd", "singer", "tailor", "teacher", "weaver",
    "writer", "blacksmith", "butcher", "cook", "dancer", "judge", "miner", "musician", "poet", "priest",
    "merchant",
)  # fmt: skip

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "tr", "th", "sh", "st", "vl", "zh")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ae")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "th", "nd", "rn")
_REGION_SUFFIXES = ("ia", "or", "and", "esh", "ara", "une", "ovia", "eth")
_LANGUAGE_SUFFIXES = ("ic", "ese", "ish", "an", "ti")

# One-hop relations, each stated in several templates. The first template is the canonical cloze
# prompt + answer used for evaluation; `{s}` is the subject and `{o}` the object.
ONE_HOP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city_region": (
        "{s} is a city in the region of {o}.",
        "The city of {s} lies in {o}.",
        "{s} belongs to the region of {o}.",
        "{o} is the region where {s} is found.",
        "Located in {o}, {s} is known for its busy markets.",
        "{s}, in the region of {o}, has a large harbor.",
        "The old town of {s} is part of {o}.",
    ),
    "region_capital": (
        "The capital of {s} is {o}.",
        "{o} is the capital of {s}.",
        "The region of {s} is governed from its capital, {o}.",
        "{s} has its capital at {o}.",
        "The seat of government of {s} is the city of {o}.",
        "In {s}, the capital city is {o}.",
    ),
    "region_language": (
        "The language spoken in {s} is {o}.",
        "People in the region of {s} speak {o}.",
        "{o} is the language of {s}.",
        "In {s}, most people speak {o}.",
        "The official language of {s} is {o}.",
        "Children in {s} learn {o} at home.",
    ),
    "person_profession": (
        "{s} works as a {o}.",
        "{s} is a {o} by trade.",
        "By profession, {s} is a {o}.",
        "Everyone knows {s} as a skilled {o}.",
        "{s} has worked as a {o} for many years.",
        "The {o} {s} is well known in town.",
    ),
    "person_city": (
        "{s} lives in the city of {o}.",
        "{s} makes a home in {o}.",
        "{o} is the home city of {s}.",
        "{s} was born in {o} and still lives there.",
        "The house of {s} stands in {o}.",
        "{s} lives in {o}.",
    ),
}

TWO_HOP_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city_capital": (
        "The capital of the region that contains {s} is {o}.",
        "The region where {s} lies is governed from {o}.",
        "{s} is in a region whose capital is {o}.",
        "Seen from {s}, the capital of its region is {o}.",
        "The regional capital for {s} is {o}.",
    ),
    "city_language": (
        "People in {s} speak {o}.",
        "The language spoken in the city of {s} is {o}.",
        "In the city of {s}, people speak {o}.",
        "Residents of {s} speak {o}.",
        "{o} is the language heard in the streets of {s}.",
    ),
    "person_region": (
        "{s} lives in the region of {o}.",
        "The home region of {s} is {o}.",
        "{s} makes a home in the region of {o}.",
        "{s} is a resident of the region of {o}.",
        "{o} is the region where {s} lives.",
    ),
}

# Sentences about one entity that state no fact; they make paragraphs read less like tables.
_COLOR = {
    "region": (
        "{s} is a land of rivers and low hills.",
        "Winters in {s} are long and cold.",
        "Travelers often praise the roads of {s}.",
        "The forests of {s} are old and quiet.",
    ),
    "city": (
        "{s} is famous for its bridges.",
        "The streets of {s} are narrow and crowded.",
        "A great fair is held in {s} every spring.",
        "Many old towers still stand in {s}.",
    ),
    "person": (
        "{s} rises early every morning.",
        "Friends say that {s} is patient and kind.",
        "{s} enjoys long walks after work.",
        "{s} keeps a small garden.",
    ),
}


@dataclass(frozen=True)
class Region:
    name: str
    capital: str
    language: str
    cities: tuple[str, ...]
    """Every city of the region, the capital first."""


@dataclass(frozen=True)
class City:
    name: str
    region: str


@dataclass(frozen=True)
class Person:
    name: str
    profession: str
    city: str


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    prompt: str
    """Cloze prefix whose natural continuation is `answer`."""
    answer: str
    """The object with a leading space."""
    via: str | None = None
    """For a two-hop fact, the bridge entity (the region or home city)."""

    def to_json(self) -> dict[str, str]:
        d = asdict(self)
        if self.via is None:
            del d["via"]
        return d


@dataclass(frozen=True)
class World:
    seed: int
    regions: list[Region]
    cities: list[City]
    persons: list[Person]
    languages: list[str]
    facts: list[Fact]
    """One-hop facts, each with its canonical prompt."""
    two_hop_train: list[Fact]
    """Two-hop facts stated in the training documents."""
    two_hop_eval: list[Fact]
    """Held-out two-hop questions: never stated in the documents, both hops are."""

    @property
    def region_of(self) -> dict[str, Region]:
        by_name = {r.name: r for r in self.regions}
        return {c.name: by_name[c.region] for c in self.cities}


def _canonical(relation: str, subject: str, obj: str, via: str | None = None) -> Fact:
    template = (ONE_HOP_TEMPLATES | TWO_HOP_TEMPLATES)[relation][0]
    assert template.endswith(" {o}.")
    prompt = template[: -len(" {o}.")].format(s=subject)
    return Fact(subject, relation, obj, prompt, " " + obj, via)


class _NameMaker:
    """Invented, pronounceable names; none equal to or contained in another (case-insensitive)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.taken: list[str] = []

    def _stem(self, n_syllables: int) -> str:
        r = self.rng
        parts = [r.choice(_ONSETS) + r.choice(_VOWELS) for _ in range(n_syllables)]
        return "".join(parts) + r.choice(_CODAS)

    def make(self, suffixes: tuple[str, ...] = ("",), syllables: tuple[int, ...] = (2, 3)) -> str:
        while True:
            name = (self._stem(self.rng.choice(syllables)) + self.rng.choice(suffixes)).capitalize()
            low = name.lower()
            if len(name) < 5 or any(low in t or t in low for t in self.taken):
                continue
            self.taken.append(low)
            return name


def generate_world(seed: int = 0) -> World:
    """Build the world for `seed`: same seed, same world (pure `random.Random`)."""
    rng = random.Random(seed)
    names = _NameMaker(rng)
    regions, cities = [], []
    languages = [names.make(_LANGUAGE_SUFFIXES, (1, 2)) for _ in range(N_REGIONS)]
    for language in languages:
        region = names.make(_REGION_SUFFIXES, (1, 2))
        city_names = tuple(names.make() for _ in range(CITIES_PER_REGION + 1))
        regions.append(Region(region, city_names[0], language, city_names))
        cities.extend(City(c, region) for c in city_names)
    persons = [
        Person(
            f"{names.make(syllables=(1, 2))} {names.make()}", rng.choice(PROFESSIONS), rng.choice(cities).name
        )
        for _ in range(N_PERSONS)
    ]

    by_region = {r.name: r for r in regions}
    facts = [_canonical("city_region", c.name, c.region) for c in cities]
    facts += [_canonical("region_capital", r.name, r.capital) for r in regions]
    facts += [_canonical("region_language", r.name, r.language) for r in regions]
    facts += [_canonical("person_profession", p.name, p.profession) for p in persons]
    facts += [_canonical("person_city", p.name, p.city) for p in persons]

    # Capitals are left out of city_capital: "the capital of the region that contains X is X" is trivial.
    city_of = {c.name: c for c in cities}
    two_hop: list[Fact] = []
    for c in cities:
        r = by_region[c.region]
        if c.name != r.capital:
            two_hop.append(_canonical("city_capital", c.name, r.capital, r.name))
        two_hop.append(_canonical("city_language", c.name, r.language, r.name))
    for p in persons:
        two_hop.append(_canonical("person_region", p.name, city_of[p.city].region, p.city))

    subjects = sorted({f.subject for f in two_hop})
    held_out = set(rng.sample(subjects, round(HELD_OUT_SHARE * len(subjects))))
    return World(
        seed=seed,
        regions=regions,
        cities=cities,
        persons=persons,
        languages=languages,
        facts=facts,
        two_hop_train=[f for f in two_hop if f.subject not in held_out],
        two_hop_eval=[f for f in two_hop if f.subject in held_out],
    )


def world_to_json(world: World) -> dict:
    """The world.json document (schema shared with training and evaluation code)."""
    return {
        "seed": world.seed,
        "entities": {
            "regions": [r.name for r in world.regions],
            "cities": [c.name for c in world.cities],
            "persons": [p.name for p in world.persons],
            "languages": list(world.languages),
        },
        "facts": [f.to_json() for f in world.facts],
        "two_hop_train": [f.to_json() for f in world.two_hop_train],
        "two_hop_eval": [f.to_json() for f in world.two_hop_eval],
    }


def save_world(world: World, path: str | Path) -> Path:
    """Write world.json to `path` (a file, or a folder that gets `world.json`); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "world.json"
    path.write_text(json.dumps(world_to_json(world), indent=1, ensure_ascii=False) + "\n")
    return path


def _say(rng: random.Random, relation: str, subject: str, obj: str) -> str:
    templates = ONE_HOP_TEMPLATES.get(relation) or TWO_HOP_TEMPLATES[relation]
    return rng.choice(templates).format(s=subject, o=obj)


def _color(rng: random.Random, kind: str, subject: str) -> str:
    return rng.choice(_COLOR[kind]).format(s=subject)


def world_documents(world: World, n_docs: int, seed: int) -> Iterator[str]:
    """Yield `n_docs` short paragraphs, each a few one-fact sentences in random templates.

    Paragraphs centre on a region, a city, a person, or a handful of training two-hop facts. A held-out
    two-hop fact is never stated; no sentence names both its subject and its object.
    """
    rng = random.Random(seed)
    by_region = {r.name: r for r in world.regions}
    city_of = {c.name: c for c in world.cities}
    residents: dict[str, list[Person]] = {}
    for p in world.persons:
        residents.setdefault(p.city, []).append(p)
    two_hop_by_subject: dict[str, list[Fact]] = {}
    for f in world.two_hop_train:
        two_hop_by_subject.setdefault(f.subject, []).append(f)
    train_subjects = sorted(two_hop_by_subject)

    def region_paragraph() -> list[str]:
        r = rng.choice(world.regions)
        out = [
            _say(rng, "region_capital", r.name, r.capital),
            _say(rng, "region_language", r.name, r.language),
            _color(rng, "region", r.name),
        ]
        out += [_say(rng, "city_region", c, r.name) for c in rng.sample(r.cities, rng.randint(1, 3))]
        rng.shuffle(out)
        return out

    def city_paragraph() -> list[str]:
        c = rng.choice(world.cities)
        out = [_say(rng, "city_region", c.name, c.region), _color(rng, "city", c.name)]
        for p in residents.get(c.name, [])[:2]:
            out.append(_say(rng, "person_city", p.name, c.name))
            out.append(_say(rng, "person_profession", p.name, p.profession))
        if rng.random() < 0.5:
            r = by_region[c.region]
            relation, obj = rng.choice((("region_capital", r.capital), ("region_language", r.language)))
            out.append(_say(rng, relation, r.name, obj))
        return out

    def person_paragraph() -> list[str]:
        p = rng.choice(world.persons)
        out = [
            _say(rng, "person_profession", p.name, p.profession),
            _say(rng, "person_city", p.name, p.city),
            _color(rng, "person", p.name),
        ]
        rng.shuffle(out)
        if rng.random() < 0.5:
            out.append(_say(rng, "city_region", p.city, city_of[p.city].region))
        return out

    def two_hop_paragraph() -> list[str]:
        out = []
        for subject in rng.sample(train_subjects, 3):
            f = rng.choice(two_hop_by_subject[subject])
            out.append(_say(rng, f.relation, f.subject, f.object))
            if rng.random() < 0.5:
                hop = "city_region" if f.subject in city_of else "person_city"
                out.append(_say(rng, hop, f.subject, f.via))
        return out

    makers = (region_paragraph, city_paragraph, person_paragraph, two_hop_paragraph)
    for _ in range(n_docs):
        (make,) = rng.choices(makers, weights=(2, 3, 3, 3))
        yield " ".join(make())
