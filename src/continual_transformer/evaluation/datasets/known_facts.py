"""General-knowledge probes a small instruct model mostly answers right: the retention side of a benchmark.

The harness keeps only the probes the base model answers correctly before learning and checks they stay
right afterwards, so breadth matters more than any one item. Answers are short and unambiguous.
Checked on SmolLM2-135M-Instruct (cloze prompts as plain text, questions in the chat template, scored by
``contains``): all but a couple are answered right. Its chat answers are full sentences ("The capital of
France is Paris."), so score these with ``contains`` rather than exact match.
"""

from __future__ import annotations

from continual_transformer.evaluation.datasets.base import GENERAL_DOC_ID, Probe


def _qa(topic: str, prompt: str, *answers: str) -> Probe:
    return Probe(GENERAL_DOC_ID, prompt, answers, "qa", f"general:{topic}")


def _cloze(topic: str, prompt: str, *answers: str) -> Probe:
    return Probe(GENERAL_DOC_ID, prompt, answers, "cloze", f"general:{topic}")


_BY_TOPIC: dict[str, tuple[Probe, ...]] = {
    "capitals": (
        _qa("capital-france", "What is the capital of France?", "Paris"),
        _cloze("capital-germany", "The capital of Germany is", "Berlin"),
        _qa("capital-japan", "What is the capital of Japan?", "Tokyo"),
        _cloze("capital-uk", "The capital of the United Kingdom is", "London"),
        _qa("capital-russia", "What is the capital city of Russia?", "Moscow"),
        _qa("capital-china", "What is the capital of China?", "Beijing", "Peking"),
        _qa("capital-egypt", "What is the capital of Egypt?", "Cairo"),
        _qa("capital-greece", "What is the capital of Greece?", "Athens"),
        _qa("capital-canada", "What is the capital of Canada?", "Ottawa"),
        _qa("capital-austria", "What is the capital of Austria?", "Vienna"),
        _qa("capital-ireland", "What is the capital of Ireland?", "Dublin"),
        _qa("capital-netherlands", "What is the capital of the Netherlands?", "Amsterdam"),
        _cloze("capital-sweden", "The capital of Sweden is", "Stockholm"),
        _qa("capital-norway", "What is the capital of Norway?", "Oslo"),
        _qa("capital-poland", "What is the capital of Poland?", "Warsaw"),
        _qa("capital-india", "What is the capital of India?", "New Delhi", "Delhi"),
        _qa("capital-mexico", "What is the capital of Mexico?", "Mexico City"),
        _qa("capital-south-korea", "What is the capital of South Korea?", "Seoul"),
        _cloze("capital-thailand", "The capital of Thailand is", "Bangkok"),
        _qa("capital-kenya", "What is the capital of Kenya?", "Nairobi"),
        _qa("capital-cuba", "What is the capital of Cuba?", "Havana"),
        _qa("capital-australia", "What is the capital of Australia?", "Canberra"),
    ),
    "geography": (
        _qa(
            "largest-ocean",
            "What is the largest ocean on Earth?",
            "the Pacific Ocean",
            "Pacific",
            "Pacific Ocean",
        ),
        _qa(
            "atlantic",
            "Which ocean lies between Europe and America?",
            "the Atlantic Ocean",
            "Atlantic",
            "Atlantic Ocean",
        ),
        _cloze("eiffel-tower", "The Eiffel Tower is in the city of", "Paris"),
        _qa("river-egypt", "Which river flows through Egypt?", "the Nile", "Nile", "Nile River"),
        _cloze("continent-kenya", "Kenya is a country on the continent of", "Africa"),
        _qa("continent-brazil", "On which continent is Brazil?", "South America"),
        _qa("highest-mountain", "What is the highest mountain in the world?", "Mount Everest", "Everest"),
        _cloze("statue-liberty", "The Statue of Liberty is in the city of", "New York", "New York City"),
        _qa("pyramids", "In which country are the pyramids of Giza?", "Egypt"),
        _cloze("great-wall", "The Great Wall is in the country of", "China"),
    ),
    "languages_currencies": (
        _qa("language-brazil", "What language is spoken in Brazil?", "Portuguese"),
        _cloze("language-spain", "The main language spoken in Spain is", "Spanish"),
        _qa("currency-japan", "What is the currency of Japan?", "the yen", "yen", "Japanese yen"),
        _qa(
            "currency-uk",
            "What is the currency of the United Kingdom?",
            "the pound",
            "pound",
            "pound sterling",
            "British pound",
        ),
    ),
    "science": (
        _qa(
            "water-boils",
            "At what temperature in degrees Celsius does water boil?",
            "100",
            "100 degrees",
            "100 degrees Celsius",
            "100°C",
        ),
        _qa("water-formula", "What is the chemical formula of water?", "H2O"),
        _qa("red-planet", "Which planet is known as the Red Planet?", "Mars"),
        _qa("earth-moon", "What is the name of Earth's natural satellite?", "the Moon", "Moon"),
        _cloze("plants-give-off", "Plants take in carbon dioxide and give off", "oxygen"),
        _qa("plants-absorb", "Which gas do plants absorb from the air?", "carbon dioxide", "CO2"),
        _qa("gas-breathe", "Which gas do humans need to breathe to stay alive?", "oxygen"),
        _qa("heart-pumps", "Which organ pumps blood through the body?", "the heart", "heart"),
        _cloze("brain", "The organ that we use to think is the", "brain"),
        _qa("symbol-gold", "What is the chemical symbol for gold?", "Au"),
        _qa("symbol-oxygen", "What is the chemical symbol for oxygen?", "O"),
        _cloze("speed-light", "Nothing travels faster than the speed of", "light"),
        _qa("earth-orbits", "What does the Earth orbit around?", "the Sun", "Sun"),
        _qa("ice-made-of", "Ice is the solid form of which liquid?", "water"),
        _qa("largest-mammal", "What is the largest mammal?", "the blue whale", "blue whale", "whale"),
        _qa(
            "largest-animal", "What is the largest animal on Earth?", "the blue whale", "blue whale", "whale"
        ),
    ),
    "authors_artists_scientists": (
        _qa("romeo-juliet", "Who wrote Romeo and Juliet?", "William Shakespeare", "Shakespeare"),
        _cloze("hamlet", "The play Hamlet was written by", "William Shakespeare", "Shakespeare"),
        _qa("mona-lisa", "Who painted the Mona Lisa?", "Leonardo da Vinci", "da Vinci", "Leonardo"),
        _qa(
            "relativity", "Which scientist developed the theory of relativity?", "Albert Einstein", "Einstein"
        ),
        _qa(
            "harry-potter",
            "Who wrote the Harry Potter books?",
            "J.K. Rowling",
            "J. K. Rowling",
            "Rowling",
            "JK Rowling",
        ),
        _qa(
            "telephone",
            "Who is credited with inventing the telephone?",
            "Alexander Graham Bell",
            "Graham Bell",
            "Bell",
        ),
        _cloze(
            "gravity-apple",
            "The scientist who described gravity after watching an apple fall was Isaac",
            "Newton",
        ),
        _qa("moon-first", "Who was the first person to walk on the Moon?", "Neil Armstrong", "Armstrong"),
        _qa("pride-prejudice", "Who wrote Pride and Prejudice?", "Jane Austen", "Austen"),
        _qa("nineteen-84", "Who wrote the novel 1984?", "George Orwell", "Orwell"),
        _qa("odyssey", "Who wrote the Odyssey?", "Homer"),
        _cloze("penicillin", "Penicillin was discovered by", "Alexander Fleming", "Fleming"),
    ),
    "calendar_time": (
        _qa("days-week", "How many days are there in a week?", "7", "seven"),
        _qa("first-month", "What is the first month of the year?", "January"),
        _qa("last-month", "What is the last month of the year?", "December"),
        _qa("after-january", "Which month comes after January?", "February"),
        _qa("months-year", "How many months are there in a year?", "12", "twelve"),
        _qa("seconds-minute", "How many seconds are in a minute?", "60", "sixty"),
        _cloze("hours-day", "The number of hours in one day is", "24", "twenty-four"),
    ),
    "arithmetic_shapes": (
        _qa("add-2-2", "What is 2 plus 2?", "4", "four"),
        _qa("mul-10-10", "What is 10 multiplied by 10?", "100", "one hundred"),
        _qa("half-ten", "What is half of 10?", "5", "five"),
        _qa("add-5-3", "What is 5 plus 3?", "8", "eight"),
        _qa("sides-triangle", "How many sides does a triangle have?", "3", "three"),
        _qa("dog-legs", "How many legs does a dog have?", "4", "four"),
        _qa("piano-keys", "Which musical instrument has 88 keys?", "the piano", "piano"),
    ),
    "colours_animals_food": (
        _qa("sky-colour", "What colour is a clear sky on a sunny day?", "blue"),
        _qa("leaves-colour", "What colour are the leaves of most trees in summer?", "green"),
        _qa("honey-insect", "What insect makes honey?", "the bee", "bee", "bees", "honeybee", "honey bee"),
        _qa("wine-fruit", "Which fruit is wine made from?", "grapes", "grape"),
    ),
    "language": (
        _qa("opposite-hot", "What is the opposite of hot?", "cold"),
        _qa("opposite-big", "What is the opposite of big?", "small", "little"),
        _qa("opposite-day", "What is the opposite of day?", "night"),
        _qa("opposite-up", "What is the opposite of up?", "down"),
        _qa("plural-child", "What is the plural of child?", "children"),
        _qa("alphabet-letters", "How many letters are in the English alphabet?", "26", "twenty-six"),
    ),
}


def _interleave(groups: dict[str, tuple[Probe, ...]]) -> tuple[Probe, ...]:
    """Round-robin over topics, so that any prefix of the list is broad (the harness may ask only the first
    N)."""
    out, queues = [], [list(g) for g in groups.values()]
    while any(queues):
        out.extend(q.pop(0) for q in queues if q)
    return tuple(out)


KNOWN_FACTS: tuple[Probe, ...] = _interleave(_BY_TOPIC)
"""About 90 general-knowledge probes (``doc_id`` ``"general"``), topics interleaved."""
