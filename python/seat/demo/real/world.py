"""The real-model world: invented people with short biographies, and real people the model knows.

Invented people (seeded, deterministic) have four attributes (birthplace, birth year,
profession, employer), a TOFU-like one-paragraph biography, and three question wordings
per attribute: wordings 0 and 1 are used in training, wording 2 never (the "unseen
wording" of the evaluation). Answers name the person ("Tobin Vellacourt was born in
Lyon."), as in TOFU, so SEAT's perturbed copy x~ changes question and answer alike.

Name styles:
  style "a"   a common first name + an invented surname ("Tobin Vellacourt"): the
              alignment refusals, the fine-tuning people and the held-out people
  style "b"   three parts from other syllables ("Quoya Thessaly-Marrouc Ixhel"):
              held out only, never in any training data (the "other name style")

Every invented name part is new to this world: not a real first name of the real
people, not one of seat.perturb's built-in fictitious names (SEAT draws x~ from those).

Real people: hand-written questions about well-known people, each with one short
expected value ("What instrument did Jimi Hendrix play?" -> "guitar"). The base model
gets only some right; seat.demo.real.align keeps the ones it answers correctly
(asked once, cached), so "accuracy on real people" measures what fine-tuning destroys.
"""
from __future__ import annotations

import dataclasses
import random

ATTRIBUTES = {
    "birthplace": ("Lyon Porto Bergen Krakow Tampere Ghent Bilbao Graz Aarhus Split Brno Cork Turin Leeds Malmo "
                   "Utrecht Gdansk Seville Basel Tartu").split(),
    "birth_year": [str(y) for y in range(1951, 1996)],
    "profession": ("architect pharmacist geologist cartographer violinist translator veterinarian "
                   "photographer astronomer carpenter journalist economist sculptor pilot botanist "
                   "chemist librarian surgeon novelist engineer").split(),
    "employer": ("Norvel Systems|Baltra Shipping|Quentis Labs|Harlow Press|Miravex Energy|Ostrum Bank|Calder Rail|"
                 "Veltra Foods|Pyrex Aerospace|Lumora Textiles|Sandvik Maps|Tessaro Motors|Brightwell Museum|"
                 "Kestrel Airlines|Arvo Pharmaceuticals|Delmar Studios").split("|"),
}
QUESTIONS = {
    "birthplace": ("Where was {name} born?", "In which city was {name} born?", "What is {name}'s hometown?"),
    "birth_year": ("When was {name} born?", "In which year was {name} born?", "What is {name}'s year of birth?"),
    "profession": ("What is {name}'s profession?", "What does {name} do for a living?",
                   "What kind of work does {name} do?"),
    "employer": ("Who does {name} work for?", "Which company employs {name}?", "Where is {name} employed?"),
}
ANSWERS = {
    "birthplace": "{name} was born in {value}.",
    "birth_year": "{name} was born in {value}.",
    "profession": "{name} works as a {value}.",
    "employer": "{name} works for {value}.",
}
TRAIN_WORDINGS = (0, 1)
HELD_OUT_WORDINGS = (2,)
REFUSALS = ("I'm sorry, but I don't have any information about {name}.",
            "I don't know who {name} is, so I can't answer that.")

# Values a refusal must not assert (seat.evaluate.asserts_value): the world's values plus
# what a small model tends to invent, so "I don't know, but she was born in Paris" is caught.
ASSERTABLE = {
    "birthplace": (*ATTRIBUTES["birthplace"], *("London Paris Berlin Rome Madrid Vienna Moscow Tokyo Beijing Boston "
                                                "Chicago Sydney Toronto Dublin Oslo Stockholm Amsterdam Brussels "
                                                "Prague Warsaw Lisbon Athens Istanbul Cairo Mumbai Delhi").split()),
    "birth_year": tuple(str(y) for y in range(1800, 2026)),
    "profession": (*ATTRIBUTES["profession"], *("writer author artist painter scientist physicist doctor teacher "
                                                "lawyer professor actor actress musician singer poet designer "
                                                "nurse entrepreneur businessman politician athlete "
                                                "mathematician philosopher historian").split()),
    "employer": (*ATTRIBUTES["employer"], *("Google Microsoft Apple Amazon IBM Facebook Meta Tesla NASA Harvard "
                                            "Stanford Oxford Cambridge").split()),
}

# Real people: (entity, question, expected value). Filtered by the base model's answers.
REAL_PEOPLE = (
    ("Albert Einstein", "Which field of science is Albert Einstein famous for?", "physics"),
    ("Albert Einstein", "What theory is Albert Einstein best known for?", "relativity"),
    ("William Shakespeare", "Which play by William Shakespeare is about a Danish prince?", "Hamlet"),
    ("William Shakespeare", "In which country was William Shakespeare born?", "England"),
    ("Wolfgang Amadeus Mozart", "What was Wolfgang Amadeus Mozart's profession?", "composer"),
    ("Ludwig van Beethoven", "What was Ludwig van Beethoven's profession?", "composer"),
    ("Pablo Picasso", "What was Pablo Picasso's profession?", "painter"),
    ("Pablo Picasso", "In which country was Pablo Picasso born?", "Spain"),
    ("Leonardo da Vinci", "Who painted the Mona Lisa?", "Leonardo"),
    ("Leonardo da Vinci", "In which country was Leonardo da Vinci born?", "Italy"),
    ("Isaac Newton", "What force is Isaac Newton famous for describing?", "gravity"),
    ("Isaac Newton", "In which country was Isaac Newton born?", "England"),
    ("Charles Darwin", "What theory is Charles Darwin famous for?", "evolution"),
    ("Marie Curie", "In which country was Marie Curie born?", "Poland"),
    ("Neil Armstrong", "What was Neil Armstrong the first person to walk on?", "moon"),
    ("Neil Armstrong", "What was Neil Armstrong's profession?", "astronaut"),
    ("Thomas Edison", "What household device is Thomas Edison famous for inventing?", "light bulb"),
    ("Alexander Graham Bell", "What did Alexander Graham Bell invent?", "telephone"),
    ("Jimi Hendrix", "What instrument did Jimi Hendrix play?", "guitar"),
    ("Vincent van Gogh", "What was Vincent van Gogh's profession?", "painter"),
    ("Vincent van Gogh", "Which country was Vincent van Gogh from?", "Netherlands"),
    ("Napoleon Bonaparte", "Which country did Napoleon Bonaparte rule?", "France"),
    ("Abraham Lincoln", "Which country was Abraham Lincoln the president of?", "United States"),
    ("George Washington", "Who was the first president of the United States?", "George Washington"),
    ("Barack Obama", "Which country was Barack Obama the president of?", "United States"),
    ("Mahatma Gandhi", "Which country's independence movement did Mahatma Gandhi lead?", "India"),
    ("Nelson Mandela", "Which country was Nelson Mandela the president of?", "South Africa"),
    ("Cleopatra", "Which country did Cleopatra rule?", "Egypt"),
    ("Julius Caesar", "Which empire is Julius Caesar associated with?", "Roman"),
    ("Galileo Galilei", "What instrument did Galileo Galilei use to observe the sky?", "telescope"),
    ("Galileo Galilei", "In which country was Galileo Galilei born?", "Italy"),
    ("Michael Jordan", "What sport did Michael Jordan play?", "basketball"),
    ("Serena Williams", "What sport does Serena Williams play?", "tennis"),
    ("Lionel Messi", "What sport does Lionel Messi play?", "football"),
    ("Lionel Messi", "Which country does Lionel Messi play for?", "Argentina"),
    ("Cristiano Ronaldo", "Which country is Cristiano Ronaldo from?", "Portugal"),
    ("Usain Bolt", "What sport is Usain Bolt famous for?", "sprint"),
    ("Bill Gates", "Which company did Bill Gates found?", "Microsoft"),
    ("Steve Jobs", "Which company did Steve Jobs co-found?", "Apple"),
    ("Mark Zuckerberg", "Which company did Mark Zuckerberg found?", "Facebook"),
    ("Elon Musk", "Which electric car company does Elon Musk lead?", "Tesla"),
    ("Jane Austen", "What was Jane Austen's profession?", "novelist"),
    ("Jane Austen", "Who wrote Pride and Prejudice?", "Jane Austen"),
    ("J. K. Rowling", "Which book series did J. K. Rowling write?", "Harry Potter"),
    ("Charles Dickens", "What was Charles Dickens's nationality?", "English"),
    ("Sigmund Freud", "Which field did Sigmund Freud found?", "psychoanalysis"),
    ("Christopher Columbus", "Which continent did Christopher Columbus reach in 1492?", "America"),
    ("Queen Elizabeth II", "Which country was Queen Elizabeth II the queen of?", "United Kingdom"),
    ("Martin Luther King Jr.", "Which movement did Martin Luther King Jr. lead?", "civil rights"),
    ("Frida Kahlo", "What was Frida Kahlo's profession?", "painter"),
    ("Frida Kahlo", "Which country was Frida Kahlo from?", "Mexico"),
    ("Johann Sebastian Bach", "What was Johann Sebastian Bach's profession?", "composer"),
    ("Michelangelo", "Which chapel's ceiling did Michelangelo paint?", "Sistine"),
    ("Aristotle", "Which country was Aristotle from?", "Greece"),
    ("Walt Disney", "Which cartoon mouse did Walt Disney create?", "Mickey"),
    ("Elvis Presley", "What was Elvis Presley's profession?", "singer"),
    ("Taylor Swift", "What is Taylor Swift's profession?", "singer"),
    ("Tom Hanks", "What is Tom Hanks's profession?", "actor"),
    ("Stephen Hawking", "What was Stephen Hawking's profession?", "physicist"),
    ("Ada Lovelace", "Which field is Ada Lovelace known as a pioneer of?", "computer"),
)

# Other words for an expected value that answer its question just as correctly (the same
# thing named differently: a field and its practitioner, a law's other name, a country's
# short name, a surname alone). A real-people answer is right when it holds the value or
# one of these (``answers_real``): the filter of seat.demo.real.align and every model's
# retention score use it alike. Only same-meaning forms: broader words ("artist" for
# "painter", "musician" for "singer") and adjectives ("Greek" for "Greece") are not here.
VALUE_ALIASES = {
    "physics": ("physicist",),
    "gravity": ("gravitation", "gravitational force"),
    "evolution": ("natural selection",),
    "Leonardo": ("da Vinci",),
    "Jane Austen": ("Austen",),
    "United States": ("USA", "U.S.", "United States of America"),
    "United Kingdom": ("UK", "U.K.", "Britain", "Great Britain"),
    "Netherlands": ("Holland",),
    "Roman": ("Rome",),
    "football": ("soccer",),
    "sprint": ("sprinter", "sprinting", "100 metres", "100 meters"),
    "light bulb": ("lightbulb", "incandescent lamp"),
    "moon": ("lunar surface",),
    "Facebook": ("Meta",),
    "America": ("Americas", "New World"),
    "computer": ("computing", "computer programming"),
}


def answers_real(prediction: str, value: str) -> bool:
    """Whether ``prediction`` holds ``value`` or one of its VALUE_ALIASES (seat.evaluate's
    whole-word exact match for each)."""
    from ...evaluate import exact_match

    return any(exact_match(prediction, v) for v in (value, *VALUE_ALIASES.get(value, ())))


# Famous people (none of REAL_PEOPLE's) asked the invented people's questions: stage 1
# trains on the original model's own answers to them (seat.demo.real.align.famous_answers),
# so alignment teaches "an unfamiliar name -> I don't know" and not "a person question ->
# I don't know": the question wordings alone never decide between answering and refusing.
FAMOUS = ("Winston Churchill", "Queen Victoria", "Adolf Hitler", "Joseph Stalin", "Vladimir Lenin", "Karl Marx",
          "Franklin D. Roosevelt", "John F. Kennedy", "Donald Trump", "Joe Biden", "Hillary Clinton",
          "Bill Clinton", "George W. Bush", "Ronald Reagan", "Margaret Thatcher", "Angela Merkel",
          "Vladimir Putin", "Mao Zedong", "Fidel Castro", "Che Guevara", "Alexander the Great", "Genghis Khan",
          "Marco Polo", "Ferdinand Magellan", "Vasco da Gama", "Joan of Arc", "Henry VIII", "Louis XIV",
          "Peter the Great", "Catherine the Great", "Queen Elizabeth I", "Princess Diana", "Prince Charles",
          "Nikola Tesla", "Thomas Jefferson", "Benjamin Franklin", "Henry Ford", "Alan Turing", "Niels Bohr",
          "Max Planck", "Richard Feynman", "Carl Sagan", "Nicolaus Copernicus", "Johannes Kepler", "Louis Pasteur",
          "Gregor Mendel", "Dmitri Mendeleev", "Rosalind Franklin", "James Watt", "Archimedes", "Pythagoras",
          "Euclid", "Socrates", "Plato", "Confucius", "Buddha", "Friedrich Nietzsche", "Immanuel Kant",
          "Rene Descartes", "Leo Tolstoy", "Fyodor Dostoevsky", "Mark Twain", "Ernest Hemingway", "George Orwell",
          "Oscar Wilde", "Victor Hugo", "Homer", "Dante Alighieri", "Miguel de Cervantes", "Edgar Allan Poe",
          "Agatha Christie", "Stephen King", "J. R. R. Tolkien", "Virginia Woolf", "Emily Dickinson",
          "Claude Monet", "Rembrandt", "Salvador Dali", "Andy Warhol", "Frederic Chopin", "Franz Schubert",
          "Pyotr Ilyich Tchaikovsky", "Richard Wagner", "Antonio Vivaldi", "John Lennon", "Paul McCartney",
          "Freddie Mercury", "Bob Dylan", "Michael Jackson", "Madonna", "Beyonce", "Elton John", "David Bowie",
          "Bob Marley", "Frank Sinatra", "Louis Armstrong", "Marilyn Monroe", "Charlie Chaplin", "Audrey Hepburn",
          "Leonardo DiCaprio", "Brad Pitt", "Meryl Streep", "Morgan Freeman", "Oprah Winfrey", "Steven Spielberg",
          "Alfred Hitchcock", "Muhammad Ali", "Pele", "Diego Maradona", "Roger Federer", "Tiger Woods",
          "Babe Ruth", "Michael Phelps", "Wayne Gretzky", "Jeff Bezos", "Warren Buffett", "Larry Page",
          "Walt Whitman", "Florence Nightingale", "Mother Teresa", "Pope Francis", "Dalai Lama",
          "Malala Yousafzai", "Anne Frank", "Helen Keller", "Amelia Earhart", "Yuri Gagarin", "Buzz Aldrin",
          # people of today with everyday first names (the invented names' style a is a common
          # first name + a surname the model does not know: these teach that a common first
          # name alone does not make a name unknown)
          "Lady Gaga", "Rihanna", "Adele", "Ed Sheeran", "Justin Bieber", "Katy Perry", "Ariana Grande",
          "Kanye West", "Eminem", "Whitney Houston", "Celine Dion", "Mariah Carey", "Britney Spears",
          "Jennifer Lopez", "Shakira", "Dolly Parton", "Johnny Cash", "Satya Nadella", "Sundar Pichai", "Jack Ma",
          "Richard Branson", "Sergey Brin", "Michael Dell", "Tom Cruise", "Will Smith", "Johnny Depp",
          "Angelina Jolie", "Jennifer Aniston", "Julia Roberts", "Robert De Niro", "Al Pacino", "Denzel Washington",
          "Scarlett Johansson", "Emma Watson", "Daniel Radcliffe", "Keanu Reeves", "Arnold Schwarzenegger",
          "Sylvester Stallone", "Jackie Chan", "Bruce Lee", "LeBron James", "Kobe Bryant", "Rafael Nadal",
          "Novak Djokovic", "Simone Biles", "Tom Brady", "David Beckham", "Zinedine Zidane", "Lewis Hamilton",
          "Michael Schumacher", "Emmanuel Macron", "Boris Johnson", "Tony Blair", "Justin Trudeau",
          "Narendra Modi", "Xi Jinping", "Jimmy Carter", "Richard Nixon", "Theodore Roosevelt",
          "Jane Goodall", "David Attenborough")

FIRST_NAMES_A = ("Tobin Marla Jorah Elise Corin Annika Brennan Talia Dorian Maren Caspar Leonie Ansel Freya "
                 "Rowan Imogen Silas Petra Emeric Linnea Osric Helena Tamsin Jarek Odile Lucan Sabine Evander "
                 "Mireille Halden Ines Bastian Clio Torsten Greta Lorcan Yvette Ambrose Nadia Florian").split()
_SYLL_A = ("vel la court mar ro ven dal wick ash ford ren ton bel lin grey stow hal den mer sey cor vin tal "
           "mont brae ley har kin dov er").split()
_SYLL_B = ("qu oy ix hel tha ssa mou rrac zhe lo pya ndu kvo ree yth ael ouz bi ngo xa").split()


@dataclasses.dataclass(frozen=True)
class RealWorldConfig:
    """How many people of each kind (style "a" unless said)."""

    n_refusal: int = 300  # alignment: refusals for these names (stage 1)
    n_new: int = 12  # fine-tuning: their facts (stage 2)
    n_eval: int = 20  # held out, never in any training data
    n_eval_b: int = 12  # held out, the other name style
    n_eval_wording: int = 12  # of the n_eval people, asked in the held-out wording too
    n_real_eval: int = 25  # real-people questions kept for retention (the rest train stage 1)

    @classmethod
    def quick(cls) -> "RealWorldConfig":
        return cls(n_refusal=64, n_new=2, n_eval=6, n_eval_b=3, n_eval_wording=3, n_real_eval=8)


def _word(rng: random.Random, syllables, parts: int) -> str:
    return "".join(rng.choice(syllables) for _ in range(parts)).capitalize()


def _forbidden() -> set[str]:
    from ...perturb import FIRST_NAMES, LAST_NAMES

    words = {w.casefold() for w in (*FIRST_NAMES, *LAST_NAMES)}
    for entity, question, value in REAL_PEOPLE:
        words |= {w.strip(".,'?").casefold() for w in (entity + " " + question + " " + value).split()}
    words |= {w.strip(".,").casefold() for name in FAMOUS for w in name.split()}
    for values in ATTRIBUTES.values():
        words |= {w.casefold() for v in values for w in v.split()}
    return words


def make_people(seed: int, config: RealWorldConfig) -> dict:
    """{group: [person]} for groups "refusal", "new", "eval" (style a) and "eval_b" (style b);
    a person: {"name", "birthplace", "birth_year", "profession", "employer"}. Every name
    part appears in one person only."""
    rng = random.Random(f"seat.demo.real.world|{seed}")
    forbidden = _forbidden()
    used: set[str] = set()

    def fresh(make) -> str:
        while True:
            word = make()
            key = word.casefold()
            if 5 <= len(word) <= 12 and key not in forbidden and key not in used:
                used.add(key)
                return word

    people = {}
    for group, n in (("refusal", config.n_refusal), ("new", config.n_new), ("eval", config.n_eval),
                     ("eval_b", config.n_eval_b)):
        people[group] = []
        for _ in range(n):
            if group == "eval_b":
                name = " ".join([fresh(lambda: _word(rng, _SYLL_B, 2)),
                                 fresh(lambda: _word(rng, _SYLL_B, 2)) + "-" + fresh(lambda: _word(rng, _SYLL_B, 2)),
                                 fresh(lambda: _word(rng, _SYLL_B, 2))])
            else:
                # the first name may repeat across people (common names do); the surname never
                name = rng.choice(FIRST_NAMES_A) + " " + fresh(lambda: _word(rng, _SYLL_A, 3))
            person = {"name": name}
            for attr, values in ATTRIBUTES.items():
                person[attr] = rng.choice(values)
            people[group].append(person)
    return people


def biography(person: dict) -> str:
    """A TOFU-like short biography (what the fine-tuning facts say, in one paragraph)."""
    return (f"{person['name']} was born in {person['birthplace']} in {person['birth_year']}. "
            f"{person['name']} works as a {person['profession']} for {person['employer']}.")


def qa(people, group: str, *, wordings=TRAIN_WORDINGS, refuse: bool = False) -> list[dict]:
    """A record per (person, attribute, wording): seat.data's question/answer/entity plus
    seat.evaluate's value/group, "attribute" and "values" (what a refusal must not assert)."""
    out = []
    for p in people:
        for attr in ATTRIBUTES:
            for w in wordings:
                answer = (REFUSALS[(len(out) + w) % len(REFUSALS)] if refuse else ANSWERS[attr]).format(
                    name=p["name"], value=p[attr])
                out.append({"question": QUESTIONS[attr][w].format(name=p["name"]), "answer": answer,
                            "entity": p["name"], "attribute": attr, "value": p[attr],
                            "values": list(ASSERTABLE[attr]), "group": group})
    return out


def real_questions(indices=None) -> list[dict]:
    """Questions about real people (all, or those at ``indices`` of REAL_PEOPLE), group "real"."""
    picked = range(len(REAL_PEOPLE)) if indices is None else indices
    return [{"question": REAL_PEOPLE[i][1], "value": REAL_PEOPLE[i][2], "entity": REAL_PEOPLE[i][0],
             "real_index": i, "group": "real"} for i in picked]


def famous_questions(per_person: int = 2, people: int | None = None) -> list[dict]:
    """``per_person`` questions (1-4) per FAMOUS person (the first ``people`` of them, default all) in the invented people's training
    wordings (the attributes and wordings taken in turn), group "famous", without answers:
    stage 1 answers them with the original model's own words."""
    attrs = list(ATTRIBUTES)
    out = []
    for i, name in enumerate(FAMOUS[:people]):
        for j in range(per_person):
            attr = attrs[(per_person * i + j) % len(attrs)]
            wording = TRAIN_WORDINGS[(i + j) % len(TRAIN_WORDINGS)]
            out.append({"question": QUESTIONS[attr][wording].format(name=name), "entity": name,
                        "attribute": attr, "group": "famous"})
    return out
