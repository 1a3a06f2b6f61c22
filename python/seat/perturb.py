"""Entity perturbation: fictitious person names and entity replacement in text.

SEAT pairs each training example ``x = (question, answer)`` about an entity (a
person's name) with a copy ``x~`` in which every mention of that entity is replaced
by a fictitious name; the KL term keeps the model's next-token distribution on ``x~``
equal to the frozen base model's (see SEAT.md).

  NameGenerator     seeded, deterministic "First Last" names from built-in lists of
                    invented first and last names (or lists you give)
  EntityPerturber   draws a fictitious name per key that never is, and shares no name
                    token with, a training entity; replaces the entity in text and in
                    {question, answer, entity} records

Determinism: every name is a pure function of (seed, key) through SHA-256, never of
Python's salted ``hash()`` or of global random state, so the same run draws the same
names in every process and on every machine.

Matching rules (``EntityPerturber.perturb``):
  * Unicode: text, entity and names are compared in NFC (canonical composition), so
    "Zoë" typed as "Zoe" + a combining diaeresis (NFD) matches "Zoë" (NFC); the
    perturbed text is returned in NFC;
  * case-sensitive (names are proper nouns: the entity "Rose Lee" must not change
    "a rose"), whitespace between the entity's tokens matches any run of whitespace;
  * whole words only: a match is not preceded by a word character (nor by "X-" or
    "X'" with X a word character) and not followed by a word character (nor by "-X"),
    so "Ann" does not change "Annual", "Joanne", "Ann-Marie" or "O'Ann";
  * possessives stay: "Ann Lee's" -> "Zora Quill's" (the apostrophe is not a word
    character, so the "'s" is kept as it is);
  * with ``replace_parts=True`` (the default) a multi-token entity's first-name-only
    and last-name-only mentions are replaced as well, by the fake's first and last
    token ("Ann" -> "Zora", "Lee" -> "Quill"). The full name is tried first at every
    position. Leading honorifics (Dr., Mr., Sir, ...) and trailing suffixes (Jr., III,
    ...) are not parts, and a part must be a word of at least two characters (initials
    such as "J." are never replaced on their own). Middle names are not parts.

Errors name the argument (or the entity) and say what to do: TypeError for a wrong
type, ValueError for a wrong value.
"""
from __future__ import annotations

import functools
import hashlib
import json
import numbers
import re
import unicodedata
from typing import Callable, Iterable, Mapping, Sequence, Union

__all__ = [
    "FIRST_NAMES", "LAST_NAMES", "NameGenerator", "EntityPerturber", "count_mentions", "stable_key",
]

# ----------------------------------------------------------------------------- names

# Invented first and last names (written for this library, chosen to sound like names
# and to belong to no well-known person). Each is one word of letters; the two lists
# are disjoint, so a fake name's first and last token never coincide.
FIRST_NAMES: tuple[str, ...] = (
    "Aberlin", "Adaveth", "Aelwyra", "Alvareen", "Amarith", "Anselvy", "Arvenna", "Asterel", "Avlorin", "Azmerra",
    "Balvric", "Belisandre", "Berovane", "Brannoch", "Brisolde", "Calvarin", "Caressine", "Caspariel", "Celwynne",
    "Corantha", "Cyrrelin", "Dalvero", "Daresha", "Delphyra", "Dorvanel", "Drusilde", "Elvaric", "Emberlyn",
    "Endrisa", "Erevane", "Esmirra", "Falvren", "Fenwyra", "Feronne", "Florimar", "Galwenna", "Gerrowin", "Gildara",
    "Halvorin", "Helvessa", "Hyrrin", "Ilvane", "Imrith", "Isolwen", "Itherra", "Jarvelle", "Jessamor", "Jorveth",
    "Kaelor", "Kalindre", "Kestrin", "Korrane", "Lavessa", "Lirien", "Lorvane", "Lusendra", "Maelis", "Marivel",
    "Merrowen", "Mirelda", "Morvath", "Navrel", "Nerivane", "Nolwyn", "Norvessa", "Obrenna", "Olvira", "Orrick",
    "Ostravel", "Paelin", "Peregwyn", "Persivane", "Quellan", "Quorina", "Ravessa", "Rhovan", "Rilwen", "Rosmarel",
    "Saelin", "Serivane", "Sorwenna", "Sylvarin", "Taliesse", "Tarvic", "Thessarin", "Torvenne", "Ulvira", "Umbrel",
    "Urvane", "Valessa", "Varrowyn", "Velistra", "Veyla", "Wendaris", "Wilveth", "Wrenna", "Xandrel", "Xeniva",
    "Yarvin", "Ysmera", "Zandreth", "Zephrine", "Zorvane", "Zylphia", "Abrisel", "Alcedra", "Anquiel", "Bastiver",
    "Bellocai", "Brevane", "Caelwyth", "Cendrio", "Corvalis", "Daelwen", "Dravion", "Edrisel", "Elowarn", "Emrivel",
    "Faelwyn", "Fendrel", "Garimond", "Gwynlis", "Haldrith", "Ivoreth", "Jastremel", "Kaivren", "Kelvanna",
    "Liorvane", "Lysandrel", "Maravel", "Melquiro", "Naeris", "Nimrova", "Obervane", "Orlavey", "Pelinor",
    "Quintarel", "Rasmiel", "Revanna", "Selvanor", "Sidrelle", "Tamsorin", "Thyrine", "Ulbrand", "Vaelora",
    "Vespiran", "Wystria", "Xerion", "Yllaria", "Zerevan", "Aldwynne", "Brisvane", "Corwenna", "Delmorra",
    "Elsbrand", "Fariel", "Gavrethe", "Halcyra", "Iselvor", "Jovessa", "Kireneth", "Lomerin", "Mirovan", "Nestraya",
    "Odalvin", "Pyralis", "Quessamy", "Rovaline", "Savrelle", "Tovanni", "Uthmira", "Vordelle", "Wyndara", "Yestrel",
    "Zaviera",
)

LAST_NAMES: tuple[str, ...] = (
    "Aldervane", "Ambroskel", "Arkwellen", "Ashvalen", "Bellamorn", "Birchwhistle", "Blackmorrow", "Brindlemoor",
    "Corvannis", "Dalgrove", "Dunmarrow", "Elderquist", "Embervale", "Farrowind", "Fenmorrow", "Galloran",
    "Glimmerholt", "Greythorne", "Harrowmere", "Hollowend", "Ironvale", "Jessenwick", "Kettlebrand", "Kilvarren",
    "Larkspire", "Lindqvane", "Marrowick", "Mistlewood", "Morrovane", "Nettlefield", "Northwyn", "Oakenthal",
    "Orvellis", "Pellwright", "Pinnacombe", "Quillfeather", "Ravensmere", "Redhollow", "Rookwither", "Saltmarrow",
    "Silverhithe", "Stormhallow", "Tamberlyne", "Thistlemoor", "Thornquist", "Umberlain", "Valdemorn", "Vantreece",
    "Wexmoor", "Willowmere", "Wrenhallow", "Yarrowby", "Zephyrholt", "Abernalt", "Ambleforth", "Ashcarrow",
    "Barrowquill", "Beckinstall", "Blythemarr", "Bramblecott", "Brackwater", "Calderwynd", "Cinderlow", "Cobblemere",
    "Copperwick", "Crowhollis", "Dapplefen", "Drakemoor", "Duskwallow", "Eastermarch", "Elmsworthy", "Fallowmere",
    "Fernbrake", "Flintwhistle", "Foxcarrow", "Gallowmere", "Gildermoor", "Glenwarrow", "Goldthistle", "Grimmholt",
    "Hazelquist", "Heathervane", "Hollinsmere", "Hornwhistle", "Inglemarsh", "Ivywick", "Jadevarrow", "Juniperhall",
    "Kestrelmoor", "Kingsmarrow", "Lanternfield", "Lichvale", "Loamsworth", "Mallowbrook", "Marlowick",
    "Meadowquill", "Millbrandt", "Moonwhistle", "Mossgrove", "Nightbarrow", "Norrowind", "Oakhallow", "Oldenmarsh",
    "Otterwick", "Palewhistle", "Pebblethorn", "Pinewarden", "Quarrymoor", "Quenwick", "Ravelholt", "Reedmarrow",
    "Ridgewhistle", "Rosethorne", "Rushcombe", "Sablemoor", "Sandquist", "Shadowmere", "Sheaffield", "Slatewhistle",
    "Sorrelgate", "Sparrowmere", "Stonequill", "Sunderholt", "Swalehurst", "Tallowmere", "Tanglewhit",
    "Thimblebrook", "Tidewarren", "Timberquist", "Torrinhall", "Umbervale", "Underwhistle", "Valewright",
    "Vellacott", "Verdantholm", "Wainscombe", "Wardenholt", "Whistlecairn", "Wickerham", "Windlebrook",
    "Winterquill", "Wolfsbarrow", "Wyvernholt", "Yewbrandt", "Zellerwick", "Ambervane", "Briarwhistle",
    "Cairnwallow", "Dewmarrow", "Emberwick", "Frostquill", "Glasswarden", "Hearthmoor", "Islevane", "Jaspercombe",
    "Knollwhistle", "Lynxmoor", "Merrowgate", "Nimblewood", "Orchardquist", "Plumhollow", "Quicksilvane",
    "Runnelmoor", "Saffronholt", "Thornwarden", "Ulverdane", "Vesperwick", "Wrenquill", "Yarrowdane", "Zinnamarsh",
)

_MASK64 = (1 << 64) - 1


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return int(value)


def stable_key(*parts) -> int:
    """A 63-bit non-negative int from ``parts`` (ints and strings) through SHA-256: the
    same on every run, process and machine (unlike the salted built-in ``hash``)."""
    text = "|".join(f"{type(p).__name__}:{p}" for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _check_name_list(name: str, values) -> tuple[str, ...]:
    """A non-empty sequence of one-word names -> tuple, duplicates dropped (order kept)."""
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of one-word names (str); got {type(values).__name__}")
    out: dict[str, None] = {}
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str; got {type(v).__name__}")
        v = v.strip()
        if not v or len(v.split()) != 1:
            raise ValueError(f"{name}[{i}] must be one non-empty word (no spaces); got {v!r}")
        out[v] = None
    if not out:
        raise ValueError(f"{name} is empty; give at least one name")
    return tuple(out)


class NameGenerator:
    """Deterministic fictitious person names ``"First Last"``.

    Args:
        seed: int; different seeds give different (independent-looking) name streams.
        first_names, last_names: one-word names to combine (default: the built-in
            ``FIRST_NAMES`` / ``LAST_NAMES``, 150+ invented names each, i.e. 28,000+
            combinations). Duplicates are dropped.

    ``name(key)`` is a pure function of ``(seed, key)``: SHA-256 of both picks one
    first and one last name (uniform up to a 2**-64 modulo bias). A generator is also a
    callable ``key -> name``, so it can be passed as ``EntityPerturber(names=...)``.
    """

    def __init__(self, seed: int = 0, first_names: Sequence[str] | None = None,
                 last_names: Sequence[str] | None = None):
        self.seed = _check_int("seed", seed)
        self.first_names = FIRST_NAMES if first_names is None else _check_name_list("first_names", first_names)
        self.last_names = LAST_NAMES if last_names is None else _check_name_list("last_names", last_names)

    def name(self, key: int) -> str:
        """The name for ``key`` (int, any size): ``"First Last"``."""
        key = _check_int("key", key)
        digest = hashlib.sha256(f"seat.NameGenerator|{self.seed}|{key}".encode("utf-8")).digest()
        first = self.first_names[int.from_bytes(digest[:8], "big") % len(self.first_names)]
        last = self.last_names[int.from_bytes(digest[8:16], "big") % len(self.last_names)]
        return f"{first} {last}"

    __call__ = name

    def __len__(self) -> int:
        """Number of distinct names it can produce."""
        return len(self.first_names) * len(self.last_names)

    def __repr__(self) -> str:
        return (f"NameGenerator(seed={self.seed}, {len(self.first_names)} first names, "
                f"{len(self.last_names)} last names)")


# ----------------------------------------------------------------------------- matching

# Leading / trailing tokens of an entity that are not first or last names.
_HONORIFICS = frozenset({
    "dr", "mr", "mrs", "ms", "miss", "mx", "prof", "professor", "sir", "dame", "lord", "lady", "rev", "fr", "st",
})
_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv", "v", "vi", "phd", "md", "esq"})
# A name part that may be replaced on its own: a word of >= 2 characters, word
# characters at both ends (inner hyphens / apostrophes allowed: "Jean-Luc", "O'Brien").
_PART_RE = re.compile(r"\w(?:[\w'’-]*\w)?")
_BEFORE = r"(?<!\w)(?<!\w-)(?<!\w['’])"  # not inside a word, nor after "X-" / "X'"
_AFTER = r"(?!\w)(?!-\w)"  # not inside a word, nor before "-X" ("'s" is allowed)


def _nfc(text: str) -> str:
    """``text`` in Unicode NFC: one spelling of each accented letter, whatever was typed."""
    return unicodedata.normalize("NFC", text)


def _full_key(name: str) -> str:
    """A whole name for comparisons: NFC, whitespace runs as one space, casefolded."""
    return " ".join(_nfc(name).split()).casefold()


def _norm(token: str) -> str:
    """A name token for comparisons: NFC, casefolded, punctuation stripped at both ends."""
    return _nfc(token).strip(".,;:!?\"'’()[]{}").casefold()


def _name_tokens(name: str) -> set[str]:
    return {t for t in (_norm(tok) for tok in name.split()) if t}


def _parts(entity: str) -> tuple[str | None, str | None]:
    """(first, last) name parts of an entity that may be replaced on their own."""
    tokens = entity.split()
    lo, hi = 0, len(tokens)
    while lo < hi and _norm(tokens[lo]).rstrip(".") in _HONORIFICS:
        lo += 1
    while hi > lo and _norm(tokens[hi - 1]).rstrip(".") in _SUFFIXES:
        hi -= 1
    core = tokens[lo:hi]
    if len(core) < 2:
        # "Plato": no parts. "Dr. Lee": "Lee" alone is a mention too (as a last name).
        if len(core) == 1 and len(tokens) > 1 and len(core[0]) >= 2 and _PART_RE.fullmatch(core[0]):
            return None, core[0]
        return None, None

    def ok(tok: str) -> str | None:
        return tok if len(tok) >= 2 and _PART_RE.fullmatch(tok) else None

    first, last = ok(core[0]), ok(core[-1])
    if first is not None and first == last:
        first = None
    return first, last


def _check_entity(entity) -> str:
    if not isinstance(entity, str):
        raise TypeError(f"entity must be a str (the name to replace); got {type(entity).__name__}")
    if not entity.strip():
        raise ValueError("entity is empty; give the name of the person the text is about, "
                         "spelled as it appears in the text")
    return _nfc(entity.strip())


@functools.lru_cache(maxsize=4096)
def _pattern(entity: str, replace_parts: bool) -> re.Pattern:
    full = r"\s+".join(re.escape(tok) for tok in entity.split())
    alts = [f"(?P<full>{full})"]
    if replace_parts:
        first, last = _parts(entity)
        if first is not None:
            alts.append(f"(?P<first>{re.escape(first)})")
        if last is not None:
            alts.append(f"(?P<last>{re.escape(last)})")
    return re.compile(f"{_BEFORE}(?:{'|'.join(alts)}){_AFTER}")


def count_mentions(text: str, entity: str, *, replace_parts: bool = True) -> int:
    """How many mentions of ``entity`` ``EntityPerturber.perturb`` would replace in
    ``text`` (full-name mentions, plus first-/last-name-only ones with replace_parts)."""
    entity = _check_entity(entity)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    return sum(1 for _ in _pattern(entity, bool(replace_parts)).finditer(_nfc(text)))


# ----------------------------------------------------------------------------- perturber

NameSource = Union[None, Sequence[str], Callable[[int], str]]


class EntityPerturber:
    """Replaces a training entity by a fictitious name that is safely not a training entity.

    Args:
        exclude: the training entities (an iterable of names, e.g. every record's
            ``entity``). A fictitious name is never one of them (case-insensitive) and
            shares no name token with any of them (tokens compared casefolded, with
            punctuation stripped), so "Ann Quill" is rejected when "Ann Lee" is
            excluded.
        names: where fictitious names come from:
            None (default): ``NameGenerator(seed)`` over the built-in lists, with every
              first/last name that is a token of an excluded entity removed up front;
            a sequence of names: a name is picked by a SHA-256 of (seed, key) among the
              names that pass the exclusion rule (an error up front if none does);
            a callable ``key -> name`` (e.g. your own ``NameGenerator``): must return a
              non-empty str; a name that fails the exclusion rule is redrawn with the
              key-derived keys ``stable_key("retry", key, i)``, i = 1, 2, ...
        seed: int seed of the default generator and of the pick from a list.
        replace_parts: also replace first-name-only and last-name-only mentions of a
            multi-token entity (see the module docstring for the exact rules).
    """

    MAX_REDRAWS = 256

    def __init__(self, exclude: Iterable[str], names: NameSource = None, seed: int = 0,
                 replace_parts: bool = True):
        self.seed = _check_int("seed", seed)
        self.replace_parts = bool(replace_parts)
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
            raise TypeError("exclude must be an iterable of entity names (e.g. a list of every record's "
                            f"'entity'); got {type(exclude).__name__}")
        full: set[str] = set()
        tokens: set[str] = set()
        for i, e in enumerate(exclude):
            if not isinstance(e, str):
                raise TypeError(f"exclude[{i}] must be a str (an entity name); got {type(e).__name__}")
            if not e.strip():
                raise ValueError(f"exclude[{i}] is empty; every excluded entity must be a non-empty name")
            full.add(_full_key(e))
            tokens |= _name_tokens(e)
        self._excluded_full = frozenset(full)
        self._excluded_tokens = frozenset(tokens)

        self._list: tuple[str, ...] | None = None
        self._callable: Callable[[int], str] | None = None
        if names is None:
            first = [n for n in FIRST_NAMES if _norm(n) not in tokens]
            last = [n for n in LAST_NAMES if _norm(n) not in tokens]
            if not first or not last:  # only if someone excludes the whole built-in list
                raise ValueError("every built-in first or last name is a token of an excluded entity; "
                                 "pass names= (a list or a callable) with other fictitious names")
            self.generator: NameGenerator | None = NameGenerator(self.seed, first, last)
            self._callable = self.generator
        elif callable(names):
            self.generator = names if isinstance(names, NameGenerator) else None
            self._callable = names
        elif isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError("names must be None, a sequence of names, or a callable key -> name; "
                            f"got {type(names).__name__}")
        else:
            self.generator = None
            cleaned: dict[str, None] = {}
            for i, n in enumerate(names):
                if not isinstance(n, str):
                    raise TypeError(f"names[{i}] must be a str; got {type(n).__name__}")
                if not n.strip():
                    raise ValueError(f"names[{i}] is empty; every fictitious name must be a non-empty str")
                cleaned[" ".join(_nfc(n).split())] = None
            if not cleaned:
                raise ValueError("names is an empty list; give fictitious names or leave names=None")
            usable = tuple(n for n in cleaned if not self._conflict(n))
            if not usable:
                raise ValueError(f"none of the {len(cleaned)} names in `names` is usable: each is an excluded "
                                 "entity or shares a first/last name with one; add fictitious names that share "
                                 "no name token with the training entities")
            self._list = usable

    # -- exclusion -------------------------------------------------------------------

    def _conflict(self, name: str, avoid_full=frozenset(), avoid_tokens=frozenset()) -> bool:
        key = _full_key(name)
        toks = _name_tokens(name)
        return (key in self._excluded_full or key in avoid_full
                or bool(toks & self._excluded_tokens) or bool(toks & avoid_tokens))

    def is_excluded(self, name: str) -> bool:
        """True if ``name`` is an excluded entity or shares a name token with one."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str; got {type(name).__name__}")
        return self._conflict(name)

    # -- drawing ---------------------------------------------------------------------

    def fictitious_name(self, key: int, avoid: Iterable[str] = ()) -> str:
        """The fictitious name for ``key`` (int): deterministic in (seed, names, key).

        ``avoid``: extra names (e.g. the record's own entity, if it is not in
        ``exclude``) that the result must not be or share a name token with.
        Raises ValueError if no acceptable name can be found (a list whose usable names
        all clash with ``avoid``, or a callable that keeps returning excluded names).
        """
        key = _check_int("key", key)
        avoid = (avoid,) if isinstance(avoid, str) else tuple(avoid)
        for i, a in enumerate(avoid):
            if not isinstance(a, str):
                raise TypeError(f"avoid[{i}] must be a str (a name); got {type(a).__name__}")
        avoid_full = frozenset(_full_key(a) for a in avoid)
        avoid_tokens = frozenset().union(*(_name_tokens(a) for a in avoid)) if avoid_full else frozenset()

        if self._list is not None:
            n = len(self._list)
            start = stable_key("seat.EntityPerturber.pick", self.seed, key) % n
            for j in range(n):
                name = self._list[(start + j) % n]
                if not self._conflict(name, avoid_full, avoid_tokens):
                    return name
            raise ValueError(f"no name in `names` can stand in for {sorted(avoid)}: every usable name shares a "
                             "name token with it; add more fictitious names")

        for attempt in range(self.MAX_REDRAWS):
            k = key if attempt == 0 else stable_key("retry", key, attempt)
            name = self._callable(k)
            if not isinstance(name, str):
                raise TypeError(f"names({k}) must return a str (a fictitious name); got {type(name).__name__}")
            if not name.strip():
                raise ValueError(f"names({k}) returned an empty name; it must return a non-empty fictitious name")
            name = " ".join(_nfc(name).split())
            if not self._conflict(name, avoid_full, avoid_tokens):
                return name
        raise ValueError(f"names returned only excluded names for key {key} ({self.MAX_REDRAWS} key-derived "
                         f"draws; the last was {name!r}); make it return fictitious names that are not training "
                         "entities and share no first or last name with one")

    # -- replacing -------------------------------------------------------------------

    def _subn(self, text: str, entity: str, fake: str) -> tuple[str, int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        entity = _check_entity(entity)
        if not isinstance(fake, str):
            raise TypeError(f"fake must be a str (the fictitious name); got {type(fake).__name__}")
        fake = " ".join(_nfc(fake).split())
        if not fake:
            raise ValueError("fake is empty; pass a fictitious name, e.g. perturber.fictitious_name(key)")
        fake_tokens = fake.split()
        repl = {"full": fake, "first": fake_tokens[0], "last": fake_tokens[-1]}

        def sub(m: re.Match) -> str:
            return repl[m.lastgroup]

        return _pattern(entity, self.replace_parts).subn(sub, _nfc(text))

    def perturb(self, text: str, entity: str, fake: str) -> str:
        """``text`` (in NFC) with every mention of ``entity`` replaced by ``fake``.

        Whole-word, case-sensitive matches; possessives kept ("Ann Lee's" ->
        "Zora Quill's"); with replace_parts, "Ann" -> fake's first token and "Lee" ->
        fake's last token (see the module docstring). Text without a mention is
        returned unchanged.
        """
        return self._subn(text, entity, fake)[0]

    def perturb_record(self, record: Mapping, key: int) -> tuple[dict, str]:
        """Perturb a record ``{"question", "answer", "entity", ...}`` with the name for ``key``.

        Returns ``(copy, fake)``: a shallow copy of the record whose question and answer
        (in NFC) have every mention of the entity replaced by the same ``fake`` (drawn by
        ``fictitious_name(key, avoid=entity)``) and whose ``"entity"`` is ``fake``;
        other keys are copied unchanged. Raises ValueError if the entity is empty or
        mentioned in neither question nor answer.
        """
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a dict with 'question', 'answer' and 'entity'; "
                            f"got {type(record).__name__}")
        missing = [k for k in ("question", "answer", "entity") if k not in record]
        if missing:
            raise ValueError(f"record is missing {', '.join(map(repr, missing))}; "
                             "it needs 'question', 'answer' and 'entity' (str)")
        for k in ("question", "answer", "entity"):
            if not isinstance(record[k], str):
                raise TypeError(f"record[{k!r}] must be a str; got {type(record[k]).__name__}")
        entity = _check_entity(record["entity"])
        fake = self.fictitious_name(key, avoid=(entity,))
        question, nq = self._subn(record["question"], entity, fake)
        answer, na = self._subn(record["answer"], entity, fake)
        if nq + na == 0:
            how = " (or its first or last name alone)" if self.replace_parts and any(_parts(entity)) else ""
            raise ValueError(f"entity {entity!r} is mentioned in neither the question nor the answer; the entity "
                             f"must appear in the text{how} as a whole word, spelled and capitalized exactly as "
                             "in 'entity'")
        out = dict(record)
        out["question"], out["answer"], out["entity"] = question, answer, fake
        return out, fake

    def config(self) -> dict:
        """What decides the names drawn and the text replaced, beside the keys: JSON-able,
        compared when a training run resumes (excluded entities and name lists as
        SHA-256 digests)."""
        def digest(values) -> str:
            return hashlib.sha256(json.dumps(sorted(values)).encode("utf-8")).hexdigest()

        if self._list is not None:
            names = {"list_sha256": digest(self._list)}
        elif self.generator is not None:
            names = {"generator_seed": self.generator.seed, "first_sha256": digest(self.generator.first_names),
                     "last_sha256": digest(self.generator.last_names)}
        else:
            names = {"callable": getattr(self._callable, "__qualname__", type(self._callable).__name__)}
        return {"class": type(self).__name__, "seed": self.seed, "replace_parts": self.replace_parts,
                "excluded_sha256": digest(self._excluded_full), "names": names}

    def __repr__(self) -> str:
        if self._list is not None:
            src = f"{len(self._list)} listed names"
        elif self.generator is not None:
            src = repr(self.generator)
        else:
            src = "callable names"
        return (f"EntityPerturber({len(self._excluded_full)} excluded entities, {src}, seed={self.seed}, "
                f"replace_parts={self.replace_parts})")
