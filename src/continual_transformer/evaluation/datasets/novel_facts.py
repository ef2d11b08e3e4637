"""Generated documents about fictional entities, with probes no model can answer before learning them.

Every name is composed from syllables by a seeded RNG (so a given seed always yields the same benchmark, on
any machine), is at least 6 letters long, is used once in the whole benchmark, and is checked against a
blocklist of common words and well-known names (grown until no name generated for seeds 0-399 was a whole
word of a 30k English word-piece vocabulary). Answers are invented too (towns, companies, people, rivers)
or are years and numbers; the few answers drawn from short lists (professions, colours, materials) are
guessable only by chance. SmolLM2-135M-Instruct answered 0 of 80 probes of ``novel_facts(10)`` before
learning.

Each document describes one entity in 2-6 sentences, each fact rendered with one of several templates, in a
shuffled order, sometimes with a filler sentence that states nothing probed. Each fact gets two probes: a
cloze prompt ending right before the answer, worded with a *different* template from the one the document
used whenever one exists, and a question in yet other words. LESSONS.md says why: a method can lower a
document's loss without making its facts answerable in other words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from continual_transformer.documents import make_document
from continual_transformer.evaluation.datasets.base import KnowledgeBenchmark, Probe

# ------------------------------------------------------------------------------------------------------------
# Names

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "sk",
    "st",
    "t",
    "tr",
    "v",
    "vr",
    "z",
    "th",
    "sv",
    "kv",
    "b",
    "d",
    "k",
    "l",
    "m",
    "n",
    "r",
    "s",
    "t",
    "v",
)
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_INNER_CODAS = ("", "", "", "n", "r", "l", "s", "sk", "rn")
_ENDINGS = {
    "given": ("a", "ela", "in", "or", "ek", "ira", "an", "ius", "et", "ina", "ov", "ric"),
    "surname": ("en", "ski", "ova", "ard", "ijlen", "ecki", "sson", "ani", "ek", "ow", "ier", "quist"),
    "town": ("stow", "mark", "holm", "wick", "ach", "ene", "avo", "ness", "by", "ingen", "ton", "dal"),
    "country": ("ia", "ria", "and", "ovia", "ene", "ador", "esh", "uria"),
    "river": ("is", "ine", "ar", "ent", "uva", "el", "ond"),
    "region": ("a", "ero", "an", "ith", "orra", "une"),
    "company": ("ex", "ion", "ara", "ant", "ix", "ova", "eth", "ari"),
    "brand": ("ex", "o", "ine", "ar", "um", "ette", "on"),
    "species": ("ine", "ian", "ose", "ard", "el", "ick"),
}
_VOWELS = frozenset("aeiouy")
_BAD_PAIRS = (
    "aa",
    "ee",
    "ii",
    "oo",
    "uu",
    "yy",
    "jj",
    "hh",
    "vv",
    "kk",
    "zz",
    "yi",
    "iy",
    "uy",
    "yu",
    "ijij",
)
_MIN_LENGTH = 6

# Whole words no generated name may be: common English words and well-known names the syllables can spell.
_BLOCKLIST = frozenset(
    """
banana bandit banner barrel basket batman beaker became become belong better border borrow bottle bottom
branch brandy breath bridge bright broken brother bucket budget burden butter button cannon canvas carbon
career carpet castle cattle cellar dinner doctor dollar donkey dragon dreams driver father fellow finger
folder forest forget format frozen garden ginger golden gospel govern hammer harbor harvest helmet hermit
honest ladder lesson letter lizard manner marine market marrow master matter meadow member mentor mirror
modern mother murder museum napkin narrow nation nectar needle number orange parade parrot pardon parent
pepper person pillow pirate pistol planet pocket poison potato powder prison profit proper rabbit random
reason record remedy ribbon rocket rubber saddle salmon sister sketch slogan summer sunset tablet teller
temple tender thrive timber tomato tongue turkey velvet vendor vessel violin walrus winter wonder yellow
zebra zipper balkan baroness bastard billion define divine dryness kelvin mansion region remark retina
saline stolen legion lotion motion potion notion fusion vision session version fashion cousin basin robin
satin marine ravine routine canine feline engine famine vaccine machine pliant tyrant vibrant instant distant
servant complex reflex vortex annex duplex simplex latex disson
braden dunbar dustin marius sabine stella hazard barnet barren bastion burrow darius driven gareth garion
gastro gunnar harvard kendra kernel lilith medina morton mustard pastor pennant ration serpent silent sirius
souven tarzan truman
abigail adrian albert alexander alfred alison amanda andrea angela angelo anthony antonio arthur barbara
bernard brenda brian carlos carmen charles claire daniel deborah dennis denise doris edward eleanor elena
emilia ernest esther eugene fabian felix frank franklin gerald gordon hannah harold helena henry howard
isabel janet jeremy jordan joseph julian justin karina kristen laura lauren marina marion martin melvin
miriam morgan nathan norman oliver pamela patrick philip rachel raymond robert roland sandra selina sergei
sharon simone stefan steven sylvia teresa thomas tobias travis trevor valerie vernon victor vivian walter
warren wilson yvonne
aberdeen alaska amsterdam breton napier bringen athens austin berlin boston brazil bristol brussels canada
dallas denver dublin
geneva havana helsinki jakarta jordan kansas kosovo lisbon london madrid malawi manila mexico monaco moscow
munich nevada norway oregon orlando oxford panama prague rwanda sweden sydney toronto toledo tripoli vienna
warsaw zambia
""".split()
)
# Fragments no name may contain: famous names and words a benchmark should not spell by accident.
_BLOCKED_FRAGMENTS = (
    "paris",
    "london",
    "rome",
    "tokyo",
    "google",
    "apple",
    "amazon",
    "nokia",
    "sony",
    "tesla",
    "disney",
    "nike",
    "texas",
    "india",
    "china",
    "russia",
    "africa",
    "america",
    "europe",
    "jesus",
    "allah",
    "satan",
    "nazi",
    "hitler",
    "stalin",
    "lenin",
    "marx",
    "kill",
    "sex",
    "fuck",
    "shit",
    "porn",
    "rape",
    "dick",
    "cock",
    "cunt",
    "anal",
    "slut",
    "nigg",
    "fag",
    "whore",
    "bitch",
    "penis",
    "vagin",
    "boob",
    "tit",
    "piss",
    "crap",
    "damn",
    "cum",
    "poo",
    "fart",
    "dead",
    "die",
    "hate",
    "isis",
    "jew",
    "gay",
    "homo",
    "negro",
)


class NameForge:
    """Makes novel capitalised words from syllables, each at most once, never a blocklisted word."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.used: list[str] = []
        self._seen: set[str] = set()
        self._prefixes: set[str] = set()  # every prefix of a used word, so the prefix check is O(length)

    def word(self, style: str) -> str:
        rng = self._rng
        for _ in range(1000):
            n_syllables = rng.choice((1, 2, 2, 2))
            stem = "".join(
                rng.choice(_ONSETS)
                + rng.choice(_NUCLEI)
                + (rng.choice(_INNER_CODAS) if i < n_syllables - 1 else "")
                for i in range(n_syllables)
            )
            ending = rng.choice(_ENDINGS[style])
            if ending[0] in _VOWELS:  # no vowel pile-up at the joint: "Voska" + "ijlen" -> "Voskijlen"
                stem = stem.rstrip("aeiouy")
            word = (stem + ending).capitalize()
            if self._acceptable(word):
                low = word.lower()
                self._seen.add(low)
                self._prefixes.update(low[:k] for k in range(1, len(low) + 1))
                self.used.append(word)
                return word
        raise RuntimeError(
            f"could not make a new {style} name"
        )  # pragma: no cover - the space holds millions

    def _acceptable(self, word: str) -> bool:
        low = word.lower()
        return (
            _MIN_LENGTH <= len(low) <= 12
            and low not in _BLOCKLIST
            and not any(fragment in low for fragment in _BLOCKED_FRAGMENTS)
            and not any(pair in low for pair in _BAD_PAIRS)
            and _max_run(low, vowels=True) <= 2
            and _max_run(low, vowels=False) <= 3
            # New, and neither a prefix of a used word nor extending one (whole-word matching keeps such
            # names apart, but readers and tokenizers may not).
            and low not in self._prefixes
            and not any(low[:k] in self._seen for k in range(1, len(low)))
        )

    def person(self) -> str:
        return f"{self.word('given')} {self.word('surname')}"


def _max_run(word: str, *, vowels: bool) -> int:
    best = run = 0
    for ch in word:
        run = run + 1 if (ch in _VOWELS) == vowels else 0
        best = max(best, run)
    return best


def is_blocked(word: str) -> bool:
    """Whether ``word`` is a blocklisted word or contains a blocked fragment (the checks every name
    passes)."""
    low = word.lower()
    return low in _BLOCKLIST or any(fragment in low for fragment in _BLOCKED_FRAGMENTS)


# ------------------------------------------------------------------------------------------------------------
# Answer values: (canonical, *alternatives)

_PROFESSIONS = (
    "cartographer",
    "glassblower",
    "bookbinder",
    "clockmaker",
    "beekeeper",
    "lighthouse keeper",
    "violin maker",
    "hydrologist",
    "stonemason",
    "archivist",
    "botanist",
    "translator",
    "puppeteer",
    "ferry pilot",
    "perfumer",
    "typesetter",
    "astronomer",
    "locksmith",
    "cheesemaker",
    "organ builder",
    "land surveyor",
    "tapestry weaver",
    "seismologist",
    "falconer",
    "lacemaker",
    "rope maker",
    "marine biologist",
    "choir conductor",
    "glaciologist",
    "furniture restorer",
)
_PRODUCT_LINES = (
    "marine barometers",
    "ceramic water filters",
    "folding bicycles",
    "brass telescopes",
    "wool blankets",
    "seed drills",
    "hearing aids",
    "weather balloons",
    "canned sardines",
    "fountain pens",
    "solar kettles",
    "pipe organs",
    "glass insulators",
    "paper lanterns",
    "ice skates",
    "garden sundials",
    "fishing rods",
    "river barges",
    "wind chimes",
    "snow chains",
    "beeswax candles",
    "pressure gauges",
)
_FAMOUS_FOR = (
    "salt marshes",
    "copper mines",
    "clock towers",
    "hot springs",
    "cherry orchards",
    "stone bridges",
    "tulip fields",
    "cliff monasteries",
    "glassworks",
    "goat cheese",
    "night markets",
    "lavender farms",
    "shipyards",
    "marble quarries",
    "tea houses",
    "windmills",
    "puppet theatres",
    "pottery kilns",
    "oyster beds",
    "rope factories",
)
_MATERIALS = (
    "brass",
    "walnut wood",
    "titanium",
    "cork",
    "bamboo",
    "pewter",
    "birch plywood",
    "copper",
    "ceramic",
    "carbon fibre",
    "oak",
    "sailcloth",
    "bronze",
    "cast iron",
    "frosted glass",
    "aluminium",
)
_PRODUCT_KINDS = (
    "lamp",
    "bicycle",
    "typewriter",
    "camera",
    "violin",
    "kettle",
    "telescope",
    "wristwatch",
    "radio",
    "sewing machine",
    "accordion",
    "compass",
    "microscope",
    "loom",
    "metronome",
    "barometer",
)
_COLOURS = (
    "crimson",
    "pale blue",
    "olive green",
    "golden yellow",
    "charcoal grey",
    "bright orange",
    "violet",
    "rust brown",
    "silver",
    "turquoise",
    "scarlet",
    "ivory white",
    "jet black",
    "emerald green",
)
_DIETS = (
    "fallen figs",
    "freshwater algae",
    "pine seeds",
    "small snails",
    "mosquito larvae",
    "lichen",
    "nectar",
    "river shrimp",
    "grass roots",
    "beetle grubs",
    "mushrooms",
    "plankton",
    "clover",
    "acorns",
)
_ANIMALS = (
    "moth",
    "beetle",
    "finch",
    "lizard",
    "frog",
    "vole",
    "crab",
    "snail",
    "heron",
    "eel",
    "bat",
    "salamander",
    "butterfly",
    "shrew",
    "gecko",
    "toad",
)
_REGION_KINDS = ("Highlands", "Marshes", "Basin", "Uplands", "Fens", "Steppe", "Valley", "Delta", "Plateau")
_COMPANY_KINDS = (
    "Instruments",
    "Works",
    "Foundry",
    "Holdings",
    "Cooperative",
    "Textiles",
    "Optics",
    "Mills",
    "Laboratories",
    "Shipping",
    "Ceramics",
    "Press",
)


def _number(rng: random.Random, low: int, high: int, step: int) -> str:
    return f"{rng.randrange(low, high, step):,}"


def _value(kind: str, forge: NameForge, rng: random.Random) -> tuple[str, ...]:
    if kind == "town":
        return (forge.word("town"),)
    if kind == "country":
        return (forge.word("country"),)
    if kind == "person":
        name = forge.person()
        return (name, name.split()[-1])
    if kind == "company":
        stem = forge.word("company")
        return (f"{stem} {rng.choice(_COMPANY_KINDS)}", stem)
    if kind == "river":
        name = forge.word("river")
        return (name, f"{name} river", f"the {name} river")
    if kind == "region":
        stem = forge.word("region")
        return (f"{stem} {rng.choice(_REGION_KINDS)}", stem)
    if kind.startswith("year:"):
        low, high = map(int, kind[5:].split("-"))
        return (str(rng.randrange(low, high + 1)),)
    if kind == "population":
        n = _number(rng, 1_200, 480_000, 100)
        return (n, f"{n} people", f"about {n}")
    if kind == "staff":
        n = _number(rng, 40, 9_800, 10)
        return (n, f"{n} people", f"{n} employees")
    if kind == "grams":
        n = _number(rng, 120, 4_800, 10)
        return (n, f"{n} grams", f"{n} g")
    pools = {
        "profession": _PROFESSIONS,
        "product_line": _PRODUCT_LINES,
        "famous_for": _FAMOUS_FOR,
        "material": _MATERIALS,
        "colour": _COLOURS,
        "diet": _DIETS,
    }
    return (rng.choice(pools[kind]),)


# ------------------------------------------------------------------------------------------------------------
# Templates. Fields: {S} the subject starting a sentence (the full name, or in later sentences a short
# reference), {N} the full name inside a sentence, {Sp}/{Np} their possessives, {A} the answer, {a} "a"/"an"
# for it. Statements may put the answer anywhere; clozes are prefixes the answer follows; questions end with
# "?".


@dataclass(frozen=True)
class _Attribute:
    key: str
    value: str
    statements: tuple[str, ...]
    clozes: tuple[str, ...]
    questions: tuple[str, ...]


@dataclass(frozen=True)
class _EntityType:
    name: str
    attributes: tuple[_Attribute, ...]
    fillers: tuple[str, ...]


def _attr(key: str, value: str, statements, clozes, questions) -> _Attribute:
    return _Attribute(key, value, tuple(statements), tuple(clozes), tuple(questions))


_PERSON = _EntityType(
    "person",
    (
        _attr(
            "birthplace",
            "town",
            [
                "{S} was born in the town of {A}.",
                "{Sp} birthplace is the town of {A}.",
                "{S} was born in {A}, a small town far from any city.",
            ],
            ["{S} was born in the town of", "The birthplace of {N} is the town of", "{Sp} hometown is"],
            ["Where was {N} born?", "In which town was {N} born?", "What is the hometown of {N}?"],
        ),
        _attr(
            "birth_year",
            "year:1820-1990",
            [
                "{S} was born in the year {A}.",
                "{Sp} year of birth is {A}.",
                "{S} came into the world in {A}.",
            ],
            ["{S} was born in the year", "The year of {Np} birth was", "{Sp} year of birth is"],
            ["In what year was {N} born?", "When was {N} born?", "What is {Np} year of birth?"],
        ),
        _attr(
            "profession",
            "profession",
            ["{S} works as {a} {A}.", "By profession, {N} is {a} {A}.", "{S} earns a living as {a} {A}."],
            ["{S} works as", "By profession, {N} is", "{S} earns a living as"],
            ["What does {N} do for a living?", "What is {Np} profession?", "What job does {N} have?"],
        ),
        _attr(
            "employer",
            "company",
            ["{S} is employed by {A}.", "{Sp} employer is {A}.", "For many years {N} has worked for {A}."],
            ["{S} is employed by", "{Sp} employer is", "The company that employs {N} is"],
            ["Which company employs {N}?", "Who is {Np} employer?", "For which company does {N} work?"],
        ),
        _attr(
            "teacher",
            "person",
            ["{S} studied under {A}.", "{Sp} teacher was {A}.", "As a student, {N} was trained by {A}."],
            ["{S} studied under", "{Sp} teacher was", "{S} was trained by"],
            ["Who was {Np} teacher?", "Under whom did {N} study?", "Who trained {N}?"],
        ),
    ),
    (
        "{S} rarely gives interviews.",
        "{S} keeps a detailed diary.",
        "Colleagues describe {N} as patient and precise.",
        "{S} prefers to walk rather than drive.",
        "{S} has written several short essays.",
    ),
)

_ORGANISATION = _EntityType(
    "organisation",
    (
        _attr(
            "founding_year",
            "year:1850-2010",
            ["{S} was founded in {A}.", "{S} was established in the year {A}.", "{S} has existed since {A}."],
            ["{S} was founded in the year", "{S} was established in", "{S} has existed since"],
            ["In what year was {N} founded?", "When was {N} established?", "Since when has {N} existed?"],
        ),
        _attr(
            "headquarters",
            "town",
            [
                "{S} has its headquarters in {A}.",
                "{S} is based in the city of {A}.",
                "The head office of {N} is in {A}.",
            ],
            ["{S} is headquartered in", "{S} is based in the city of", "The head office of {N} is in"],
            [
                "Where is {N} headquartered?",
                "In which city is {N} based?",
                "Where is the head office of {N}?",
            ],
        ),
        _attr(
            "founder",
            "person",
            ["{S} was founded by {A}.", "{S} was started by {A}.", "{A} founded {N}."],
            ["{S} was founded by", "The founder of {N} was", "{S} was started by"],
            ["Who founded {N}?", "Who started {N}?", "Who was the founder of {N}?"],
        ),
        _attr(
            "product",
            "product_line",
            ["{S} makes {A}.", "{S} is best known for its {A}.", "{Sp} main products are {A}."],
            ["{S} makes", "{S} is best known for its", "{Sp} main products are"],
            ["What does {N} make?", "What are {Np} main products?", "What does {N} manufacture?"],
        ),
        _attr(
            "employees",
            "staff",
            ["{S} employs {A} people.", "{S} has a staff of {A}.", "About {A} people work at {N}."],
            ["{S} employs", "The number of people who work at {N} is", "{S} has a staff of"],
            [
                "How many people does {N} employ?",
                "How many people work at {N}?",
                "How large is the staff of {N}?",
            ],
        ),
    ),
    (
        "{S} has changed its logo twice.",
        "{S} publishes a report every spring.",
        "Visitors can tour parts of {N} by appointment.",
        "{S} sponsors a small amateur football club.",
    ),
)

_PLACE = _EntityType(
    "place",
    (
        _attr(
            "country",
            "country",
            ["{S} is a town in {A}.", "{S} lies in the country of {A}.", "{S} is located in {A}."],
            ["{S} is a town in the country of", "{S} lies in the country of", "{S} is located in"],
            ["In which country is {N}?", "Which country is {N} in?", "In what country does {N} lie?"],
        ),
        _attr(
            "river",
            "river",
            [
                "The {A} river flows through {N}.",
                "{S} stands on the banks of the {A} river.",
                "{S} is built along the {A} river.",
            ],
            [
                "The river that flows through {N} is the",
                "{S} stands on the banks of the",
                "{S} is built along the",
            ],
            [
                "Which river flows through {N}?",
                "What river runs through {N}?",
                "On which river does {N} stand?",
            ],
        ),
        _attr(
            "population",
            "population",
            [
                "{S} has a population of about {A}.",
                "About {A} people live in {N}.",
                "{S} is home to roughly {A} people.",
            ],
            [
                "{S} has a population of about",
                "The number of people living in {N} is about",
                "{S} is home to roughly",
            ],
            [
                "How many people live in {N}?",
                "What is the population of {N}?",
                "How many inhabitants does {N} have?",
            ],
        ),
        _attr(
            "famous_for",
            "famous_for",
            [
                "{S} is famous for its {A}.",
                "{S} is best known for its {A}.",
                "Visitors come to {N} for its {A}.",
            ],
            ["{S} is famous for its", "{S} is best known for its", "Visitors come to {N} for its"],
            ["What is {N} famous for?", "What is {N} best known for?", "Why do visitors come to {N}?"],
        ),
        _attr(
            "settled",
            "year:1300-1899",
            [
                "{S} was founded in {A}.",
                "{S} was first settled in {A}.",
                "The first houses in {N} were built in {A}.",
            ],
            [
                "{S} was founded in the year",
                "{S} was first settled in",
                "The first houses in {N} were built in",
            ],
            [
                "When was {N} founded?",
                "In what year was {N} first settled?",
                "When were the first houses in {N} built?",
            ],
        ),
    ),
    (
        "{S} has narrow streets and a busy market square.",
        "Summers in {N} are short and windy.",
        "{S} has one railway station.",
        "Most houses in {N} have red tiled roofs.",
    ),
)

_PRODUCT = _EntityType(
    "product",
    (
        _attr(
            "maker",
            "company",
            ["{S} is made by {A}.", "{S} is manufactured by {A}.", "{A} produces {N}."],
            ["{S} is made by", "{S} is manufactured by", "The maker of {N} is"],
            ["Which company makes {N}?", "Who manufactures {N}?", "Who is the maker of {N}?"],
        ),
        _attr(
            "release_year",
            "year:1890-2015",
            ["{S} was first sold in {A}.", "{S} was released in {A}.", "{S} came onto the market in {A}."],
            ["{S} was released in the year", "{S} was first sold in", "{S} came onto the market in"],
            [
                "When was {N} released?",
                "In what year did {N} first go on sale?",
                "When did {N} come onto the market?",
            ],
        ),
        _attr(
            "material",
            "material",
            ["{S} is made of {A}.", "The body of {N} is built from {A}.", "{S} is built mainly from {A}."],
            ["{S} is made of", "The body of {N} is built from", "The main material of {N} is"],
            ["What is {N} made of?", "What material is {N} built from?", "What is the main material of {N}?"],
        ),
        _attr(
            "designer",
            "person",
            ["{S} was designed by {A}.", "The designer of {N} was {A}.", "{A} designed {N}."],
            ["{S} was designed by", "The designer of {N} was", "The person who designed {N} was"],
            ["Who designed {N}?", "Who was the designer of {N}?", "Whose design is {N}?"],
        ),
        _attr(
            "weight",
            "grams",
            [
                "{S} weighs {A} grams.",
                "{S} has a weight of {A} grams.",
                "At {A} grams, {N} is easy to carry.",
            ],
            ["{S} weighs", "{S} has a weight of", "The weight of {N} is"],
            ["How much does {N} weigh?", "What is the weight of {N}?", "How heavy is {N}?"],
        ),
    ),
    (
        "{S} comes in a plain cardboard box.",
        "Repair manuals for {N} are still in print.",
        "{S} is sold with a two-year guarantee.",
        "Collectors keep {N} in working order.",
    ),
)

_SPECIES = _EntityType(
    "species",
    (
        _attr(
            "habitat",
            "region",
            ["{S} lives in the {A}.", "{S} is found only in the {A}.", "The home of {N} is the {A}."],
            ["{S} lives in the", "{S} is found only in the", "The natural habitat of {N} is the"],
            ["Where does {N} live?", "Where is {N} found?", "What is the habitat of {N}?"],
        ),
        _attr(
            "colour",
            "colour",
            ["{S} is {A} in colour.", "{S} has {a} {A} body.", "The colour of {N} is {A}."],
            ["The colour of {N} is", "{S} has a body that is", "{S} is coloured"],
            ["What colour is {N}?", "What is the colour of {N}?", "What colour is the body of {N}?"],
        ),
        _attr(
            "diet",
            "diet",
            ["{S} feeds mainly on {A}.", "{S} eats {A}.", "The diet of {N} consists of {A}."],
            ["{S} feeds mainly on", "{S} mostly eats", "The diet of {N} consists of"],
            ["What does {N} eat?", "What does {N} feed on?", "What is the diet of {N}?"],
        ),
        _attr(
            "discoverer",
            "person",
            [
                "{S} was first described by {A}.",
                "{S} was discovered by {A}.",
                "{A} was the first to describe {N}.",
            ],
            ["{S} was discovered by", "{S} was first described by", "The discoverer of {N} was"],
            ["Who discovered {N}?", "Who first described {N}?", "Who was the discoverer of {N}?"],
        ),
        _attr(
            "discovery_year",
            "year:1780-1990",
            [
                "{S} was first described in {A}.",
                "{S} was discovered in {A}.",
                "Scientists first recorded {N} in {A}.",
            ],
            [
                "{S} was first described in the year",
                "{S} was discovered in",
                "Scientists first recorded {N} in",
            ],
            [
                "When was {N} discovered?",
                "In what year was {N} first described?",
                "When did scientists first record {N}?",
            ],
        ),
    ),
    (
        "{S} is rarely seen during the day.",
        "Little is known about how {N} raises its young.",
        "Photographs of {N} are hard to come by.",
        "{S} is protected by local law.",
    ),
)

ENTITY_TYPES = (_PERSON, _ORGANISATION, _PLACE, _PRODUCT, _SPECIES)
MAX_FACTS_PER_DOC = min(len(t.attributes) for t in ENTITY_TYPES)


# ------------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class _Entity:
    type: _EntityType
    name: str
    """Full name without article ("Drelmoss beetle")."""
    article: bool
    """Whether the name takes "the" ("the Drelmoss beetle")."""
    short_refs: tuple[str, ...]
    """Sentence-start references for later sentences ("Voskuijlen", "The company")."""

    @property
    def start(self) -> str:
        return f"The {self.name}" if self.article else self.name

    @property
    def mid(self) -> str:
        return f"the {self.name}" if self.article else self.name


def _entity(kind: _EntityType, forge: NameForge, rng: random.Random) -> _Entity:
    if kind is _PERSON:
        name = forge.person()
        return _Entity(kind, name, False, (name.split()[-1],))
    if kind is _ORGANISATION:
        return _Entity(kind, f"{forge.word('company')} {rng.choice(_COMPANY_KINDS)}", False, ("The company",))
    if kind is _PLACE:
        return _Entity(kind, forge.word("town"), False, ("The town",))
    if kind is _PRODUCT:
        product = rng.choice(_PRODUCT_KINDS)
        return _Entity(kind, f"{forge.word('brand')} {product}", True, (f"The {product}",))
    animal = rng.choice(_ANIMALS)
    return _Entity(kind, f"{forge.word('species')} {animal}", True, (f"The {animal}",))


def _possessive(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def _render(template: str, *, start: str, mid: str, answer: str = "") -> str:
    article = "an" if answer[:1].lower() in "aeiou" and answer else "a"
    return template.format(S=start, Sp=_possessive(start), N=mid, Np=_possessive(mid), A=answer, a=article)


def novel_facts(n_docs: int = 50, *, seed: int = 0, facts_per_doc: int = 4) -> KnowledgeBenchmark:
    """``n_docs`` documents about fictional entities, each with ``facts_per_doc`` facts probed twice (cloze,
    qa).

    Fully determined by ``seed``, and ``novel_facts(n)`` is the first ``n`` documents of ``novel_facts(m)``
    for ``n < m``. Entity types (person, organisation, place, product, species) take turns, so they are
    balanced.
    """
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    if not 1 <= facts_per_doc <= MAX_FACTS_PER_DOC:
        raise ValueError(f"facts_per_doc must be in [1, {MAX_FACTS_PER_DOC}], got {facts_per_doc}")
    rng = random.Random(seed)
    forge = NameForge(rng)
    documents, probes, entities = [], [], []
    block: list[_EntityType] = []
    for index in range(n_docs):
        # One RNG drawn in document order, so a smaller benchmark is a prefix of a larger one with the same
        # seed.
        if not block:
            block = list(ENTITY_TYPES)
            rng.shuffle(block)
        kind = block.pop()
        doc_id = f"novel_facts-{index:03d}"
        entity = _entity(kind, forge, rng)
        attributes = rng.sample(kind.attributes, facts_per_doc)
        answers = [_value(attr.value, forge, rng) for attr in attributes]

        sentences = []
        for i, (attr, answer) in enumerate(zip(attributes, answers, strict=True)):
            start = entity.start if i == 0 or rng.random() < 0.5 else rng.choice(entity.short_refs)
            sentences.append(
                _render(rng.choice(attr.statements), start=start, mid=entity.mid, answer=answer[0])
            )
        if len(sentences) == 1 or (len(sentences) < 6 and rng.random() < 0.5):
            filler = _render(rng.choice(kind.fillers), start=rng.choice(entity.short_refs), mid=entity.mid)
            sentences.insert(rng.randint(1, len(sentences)), filler)
        text = " ".join(sentences)
        documents.append(make_document(text, doc_id, source=None))
        entities.append({"doc_id": doc_id, "type": kind.name, "name": entity.name})

        lowered = text.lower()
        for attr, answer in zip(attributes, answers, strict=True):
            fact_id = f"{doc_id}:{attr.key}"
            clozes = [_render(c, start=entity.start, mid=entity.mid) for c in attr.clozes]
            unseen = [
                c for c in clozes if c.lower() not in lowered
            ]  # worded unlike the document, where possible
            probes.append(Probe(doc_id, rng.choice(unseen or clozes), answer, "cloze", fact_id))
            question = _render(rng.choice(attr.questions), start=entity.start, mid=entity.mid)
            probes.append(Probe(doc_id, question, answer, "qa", fact_id))

    meta = {
        "source": "generated",
        "seed": seed,
        "n_docs": n_docs,
        "facts_per_doc": facts_per_doc,
        "entities": entities,
        "invented_words": list(forge.used),
    }
    return KnowledgeBenchmark("novel_facts", tuple(documents), tuple(probes), meta)
