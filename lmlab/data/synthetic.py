"""The built-in synthetic corpus: text a few-million-parameter model can learn from on a laptop,
generated offline, deterministically from a seed, in seconds.

Why synthetic data, and why these tasks: TinyStories (Eldan & Li, 2023) showed that small models
learn fluent, coherent English when the language is simple and the vocabulary small; the
"Physics of Language Models" line of work and the induction-head analyses (Olsson et al., 2022)
showed that small models learn arithmetic procedures, retrieval and copying from clean synthetic
examples. So the corpus mixes:

- stories from a grammar: a character wants something, a problem happens *because* of a cause,
  *so* a helper and the character act, *then* it works out. Several hundred content words;
  pronouns come from each character's own pronoun set, narration is in the past tense, and the
  same entities recur from sentence to sentence;
- arithmetic (multi-digit addition, subtraction, multiplication), with worked column-by-column
  solutions (carries, borrows, partial products) and with direct answers;
- key-value lookup and copying of random strings: the tasks that grow induction heads;
- questions about stories, and formatting instructions (uppercase, one word, a bulleted list);
- chat-form instruction/response pairs and preference pairs with a *verifiable* winner;
- held-out evaluation sets with a `verify(task, prompt, answer)` scorer that recomputes the truth
  from the prompt alone, usable as a reward for RL (GRPO) and as an exact-match eval.

Every problem has a key (its operands, its key-value table, its string, its story plot). The key
is hashed into one of three buckets, train (85%), validation (5%) and eval (10%), and each
output only draws problems from its bucket: an evaluation problem never appears in any training
file, in any phrasing, by construction.

Output layout of `generate(out, config)`:

    pretrain/train.txt, val.txt      documents, each followed by a line `<|endoftext|>`
    pretrain/train.jsonl, val.jsonl  the same documents as {"text", "task"}
    sft/train.jsonl, val.jsonl       {"messages": [{"role", "content"}, ...], "task"}
    preference/train.jsonl, val.jsonl  {"prompt", "messages", "chosen", "rejected", "reason", "task"}
    eval/<task>.jsonl                {"prompt", "answer", "task"}, for task in EVAL_TASKS
    manifest.json                    generator version, seed, config, counts, sha256 of every file

Pretraining documents show a question and its answer as `<prompt>\\nAnswer: <answer>`, so a base
model is prompted with an eval prompt followed by `\\nAnswer:`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from ..atomic import atomic_directory

GENERATOR_VERSION = 1
DOC_SEPARATOR = "<|endoftext|>"
MANIFEST = "manifest.json"
EVAL_TASKS = ("add", "sub", "mul", "kv", "copy", "story_qa", "format")
DEFAULT_SIZE = "small"

# Share of problem keys in each bucket (see the module docstring).
EVAL_SHARE = 0.10
VALIDATION_SHARE = 0.05


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Counts are numbers of documents/examples; `n_eval` is per task."""

    seed: int = 0
    n_pretrain: int = 24000
    n_sft: int = 6000
    n_preference: int = 3000
    n_eval: int = 500
    val_fraction: float = 0.05  # of pretrain, sft and preference, written to the val files
    max_digits: int = 4  # operands of addition and subtraction
    max_mul_digits: int = 3  # operands of multiplication

    def __post_init__(self) -> None:
        for name in ("n_pretrain", "n_sft", "n_preference", "n_eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 1 <= self.max_digits <= 18 or not 1 <= self.max_mul_digits <= 9:
            raise ValueError("max_digits must be in 1..18 and max_mul_digits in 1..9")

    @classmethod
    def from_size(cls, size: str = DEFAULT_SIZE, seed: int = 0, n_docs: int | None = None) -> SynthConfig:
        """A named size, or `n_docs` pretraining documents with the other counts in proportion."""
        if n_docs is not None:
            if n_docs < 1:
                raise ValueError(f"n_docs must be at least 1, got {n_docs}")
            return cls(seed=seed, n_pretrain=n_docs, n_sft=max(1, n_docs // 4), n_preference=max(1, n_docs // 8),
                       n_eval=min(1000, max(10, n_docs // 50)))
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)} or give n_docs")
        return cls(seed=seed, **SIZES[size])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# tiny: tests (a fraction of a second); small: the default (~9 MB of pretraining text, a few
# seconds); medium: 5x small.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(n_pretrain=400, n_sft=120, n_preference=80, n_eval=25),
    "small": dict(n_pretrain=24000, n_sft=6000, n_preference=3000, n_eval=500),
    "medium": dict(n_pretrain=120000, n_sft=30000, n_preference=15000, n_eval=1000),
}


# --- buckets ---------------------------------------------------------------------------------

def bucket(key: str) -> str:
    """"eval", "validation" or "train" for a problem key; a pure function of the key."""
    u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    if u < EVAL_SHARE:
        return "eval"
    return "validation" if u < EVAL_SHARE + VALIDATION_SHARE else "train"


def _draw(rng: random.Random, make: Callable[[random.Random], Any], want: str | None, tries: int = 10_000) -> Any:
    """Sample `make(rng)` until its key falls in bucket `want` (rejection sampling); None: any."""
    for _ in range(tries):
        item = make(rng)
        if want is None or bucket(item.key) == want:
            return item
    raise RuntimeError(f"no {want} item in {tries} draws: the problem space is too small for this split")


@dataclass(frozen=True)
class Item:
    """One problem: `key` identifies it across phrasings; `prompt` and `answer` are its text."""

    task: str
    key: str
    prompt: str
    answer: str
    worked: str = ""  # a step-by-step solution ending in "Answer: ...", where the task has one
    show_work: bool = False  # the prompt asks for the steps (then the chat answer is `worked`)
    extra: Any = None  # task-specific data (a story's facts, a kv table) for derived examples


# --- vocabulary ------------------------------------------------------------------------------

GIRL_NAMES = (
    "Lily Mia Emma Sara Lucy Anna Zoe Ruby Ella Grace Chloe Amy Rosa Nora Hannah Ivy Maya Leah Julia Clara "
    "Daisy Molly Alice Kate Luna Ava Eva Sophie Jenny Holly Tara Nina Olivia Wendy Fiona Bella Hazel Iris "
    "Jade Penny").split()
BOY_NAMES = (
    "Tom Max Ben Sam Leo Jack Finn Noah Owen Luke Jake Adam Eli Ryan Hugo Oscar Theo Milo Alex Dan "
    "Henry Felix Jonah Liam Ethan Toby Rex Zack Ollie Kevin Oliver Peter Simon Victor Arlo Bruno Caleb Dylan "
    "Gus Ivan").split()
ANIMALS = (
    "cat dog rabbit fox bear owl duck frog mouse horse pig cow sheep goat lion tiger elephant monkey "
    "squirrel turtle hen penguin deer wolf bee hedgehog otter beaver raccoon kitten puppy pony parrot "
    "goose crab whale dolphin seal koala panda zebra giraffe badger mole lamb snail robin swan llama "
    "camel hamster").split()
OBJECTS = (
    "ball kite hat book drum boat shell cup key lamp box rope blanket bucket ring bell map coin crayon "
    "wagon scarf sock spoon feather stone basket puzzle robot doll train truck balloon whistle umbrella "
    "clock mirror shovel jar brush pencil ribbon button marble trumpet guitar flute necklace bracelet "
    "backpack lantern compass yoyo sled helmet glove boot bottle bowl pillow flag ticket crown wand "
    "rattle notebook telescope kazoo tambourine").split()
COLORS = "red blue green yellow purple orange pink brown white black gray golden silver".split()
HERO_ADJECTIVES = (
    "little brave kind curious shy happy clever tiny gentle silly busy friendly quiet sleepy playful "
    "young smart funny cheerful careful proud bold sweet polite clumsy").split()
HELPER_ADJECTIVES = "wise tall strong patient helpful old clever kind quick friendly".split()
# where a character lives, with the preposition that fits
HOMES = {
    "forest": "near", "village": "in", "farm": "on", "meadow": "by", "river": "by", "lake": "by",
    "town": "in", "city": "in", "jungle": "in", "mountain": "on", "beach": "near", "valley": "in",
    "island": "on", "garden": "near", "pond": "by", "hill": "on", "castle": "near", "desert": "in",
    "swamp": "near", "harbor": "near", "orchard": "near", "woods": "in", "cottage": "in", "field": "by",
}
OUTINGS = "park zoo beach lake playground library museum fair market river meadow hill garden".split()
FOODS = "cake pie tart pudding pancake muffin cobbler loaf cookie bun".split()
INGREDIENTS = "flour sugar butter milk honey eggs cocoa cinnamon".split()
RELATIVES = "mom dad grandma grandpa sister brother aunt uncle".split()
SKILLS = (
    "swim|dance|skate|whistle|juggle|paint|sing|ride a bike|climb trees|jump rope|fly a kite|tie knots|"
    "build sandcastles|play the drum|count to one hundred|write letters|catch fish|row a boat|knit|skip stones"
).split("|")
SAD = "sad upset worried unhappy grumpy gloomy".split()
HAPPY = "happy proud glad thankful joyful excited cheerful calm".split()
TIMES = "morning afternoon evening day".split()
OPENINGS = ("Once upon a time", "One day", "Long ago", "One sunny morning", "Not long ago", "Once")
# animals that take things, and where they take them
THIEVES = {"crow": "nest", "magpie": "nest", "squirrel": "tree", "mouse": "hole", "raccoon": "den", "fox": "den"}
SPOTS = "bushes|tall grass|pond|flower bed|pile of leaves|muddy ditch".split("|")
HIGH_PLACES = ("at the top of a tall tree", "on the roof of the barn", "on a high shelf", "on top of the fence")
FIXES = "glue tape string thread".split()
SNACKS = "sandwiches apples berries cookies grapes cheese".split()


@dataclass(frozen=True)
class Character:
    """A story character: `kind` is "girl", "boy" or an animal; the pronouns are its own, so every
    sentence about it agrees with it (a test renders stories with made-up pronouns to check)."""

    name: str
    kind: str
    he: str
    him: str
    his: str
    himself: str


SHE = ("she", "her", "her", "herself")
HE = ("he", "him", "his", "himself")


def _character(rng: random.Random, avoid_kind: str = "", avoid_name: str = "") -> Character:
    while True:
        girl = rng.random() < 0.5
        name = rng.choice(GIRL_NAMES if girl else BOY_NAMES)
        kind = ("girl" if girl else "boy") if rng.random() < 0.35 else rng.choice(ANIMALS)
        if kind != avoid_kind and name != avoid_name:
            return Character(name, kind, *(SHE if girl else HE))


def _slots(hero: Character, helper: Character) -> dict[str, str]:
    s = {"N": hero.name, "he": hero.he, "him": hero.him, "his": hero.his, "himself": hero.himself,
         "F": helper.name, "fhe": helper.he, "fhim": helper.him, "fhis": helper.his}
    s["He"], s["His"], s["fHe"] = hero.he.capitalize(), hero.his.capitalize(), helper.he.capitalize()
    return s


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# --- stories ---------------------------------------------------------------------------------

PLOTS = ("lost", "reach", "bake", "learn", "broken", "rain")


@dataclass(frozen=True)
class Plot:
    """Everything a story is about. Its key (every field) decides the story's bucket; the
    wording is drawn afterwards, so two phrasings of one plot share a bucket."""

    kind: str
    hero: Character
    helper: Character
    adjective: str
    home: str
    obj: str
    color: str
    cause: int
    detail: str  # plot-specific: an outing, a food, a skill, a high place...
    relative: str

    @property
    def key(self) -> str:
        hero, helper = self.hero, self.helper
        return (f"story:{self.kind}:{hero.name}:{hero.kind}:{hero.he}:{helper.name}:{helper.kind}:{helper.he}:"
                f"{self.adjective}:{self.home}:{self.obj}:{self.color}:{self.cause}:{self.detail}:{self.relative}")


def make_plot(rng: random.Random, hero: Character | None = None, helper: Character | None = None) -> Plot:
    kind = rng.choice(PLOTS)
    hero = hero or _character(rng)
    helper = helper or _character(rng, avoid_kind=hero.kind, avoid_name=hero.name)
    detail = {"lost": "", "reach": rng.choice(HIGH_PLACES), "bake": rng.choice(FOODS), "learn": rng.choice(SKILLS),
              "broken": rng.choice(FIXES), "rain": rng.choice(OUTINGS)}[kind]
    return Plot(kind, hero, helper, rng.choice(HERO_ADJECTIVES), rng.choice(list(HOMES)), rng.choice(OBJECTS),
                rng.choice(COLORS), rng.randrange(3), detail, rng.choice(RELATIVES))


def _helper_intro(p: Plot, rng: random.Random) -> str:
    h = p.helper
    if h.kind in ("girl", "boy"):
        return rng.choice(("{N}'s best friend was {F}, " + _a(rng.choice(HELPER_ADJECTIVES)) + f" {h.kind} from "
                           "next door.", "{N} had a good friend, {F}, who lived next door."))
    return rng.choice((f"{{N}}'s best friend was {{F}} the {h.kind}.",
                       f"{{N}} had a good friend, {{F}} the {rng.choice(HELPER_ADJECTIVES)} {h.kind}."))


def _story_body(p: Plot, rng: random.Random) -> list[str]:
    """The middle of the story: want, problem because cause, so action, then result."""
    sad, obj, color = rng.choice(SAD), p.obj, p.color
    time = rng.choice(TIMES)
    if p.kind == "lost":
        thief = rng.choice(list(THIEVES))
        spot = rng.choice(SPOTS)
        place = rng.choice(OUTINGS)
        cause, action = [
            (f"a {thief} had carried it away to its {THIEVES[thief]}",
             f"So {{N}} and {{F}} followed the {thief} to its {THIEVES[thief]}, and there was the {obj}!"),
            (f"the wind had blown it into the {spot}",
             f"So {{F}} held the branches apart with a long stick, and {{N}} pulled the {obj} out of the {spot}."),
            (f"{{he}} had left it at the {place} the day before",
             f"So {{N}} and {{F}} walked back to the {place}, and the {obj} was still there, waiting for {{him}}."),
        ][p.cause]
        return [f"{{N}} had {_a(color)} {obj} that {{he}} loved very much. {{He}} took it everywhere.",
                f"One {time}, {{N}} could not find {{his}} {obj} anywhere, because {cause}.",
                f"{{N}} felt {sad}.", action,
                f"Then {{N}} hugged {{his}} {color} {obj} and put it in a safe place."]
    if p.kind == "reach":
        cause = ["the wind had blown it up there", "{he} had thrown it too high",
                 f"a {rng.choice(('crow', 'seagull', 'magpie'))} had dropped it there"][p.cause]
        action = rng.choice(("{F} brought a long ladder and climbed up to get it.",
                             "{F} climbed up carefully and picked it up.",
                             "{F} stood on a big box and reached it with a broom."))
        return [f"{{N}} loved to play with {{his}} {color} {obj}.",
                f"One {time}, the {obj} got stuck {p.detail}, because {cause}.",
                "{N} jumped and jumped, but {he} could not reach it.", f"{{N}} felt {sad}.",
                f"So {{N}} asked {{F}} for help. {action}", f"Then {{F}} gave the {obj} back to {{N}}."]
    if p.kind == "bake":
        ingredient = rng.choice(INGREDIENTS)
        cause = ["{he} had used it all the week before", "a hungry mouse had eaten it",
                 "the jar had fallen off the shelf"][p.cause]
        return [f"{{N}} wanted to bake {_a(p.detail)} for {{his}} {p.relative}'s birthday.",
                f"{{He}} put on {{his}} {color} {obj} for good luck and went to the kitchen.",
                f"But there was no {ingredient} left, because {cause}.", f"{{N}} felt {sad}.",
                f"So {{N}} and {{F}} went to the market to buy more {ingredient}.",
                f"Then they baked the {p.detail} together, and it smelled wonderful.",
                f"{{N}}'s {p.relative} smiled and said it was the best {p.detail} ever."]
    if p.kind == "learn":
        cause = ["{he} was going too fast", "{he} was a little scared", "{he} did not know how to start"][p.cause]
        return [f"{{N}} wanted to learn to {p.detail}.",
                f"But every time {{he}} tried, it went wrong, because {cause}.", f"{{N}} felt {sad}.",
                f"So {{F}} showed {{him}} how to {p.detail} slowly, one small step at a time.",
                f"{{N}} practiced every day with {{his}} {color} {obj} beside {{him}} for luck.",
                f"Then one {time}, {{N}} could {p.detail} all by {{himself}}."]
    if p.kind == "broken":
        cause = ["{he} had dropped it on the hard floor", "a playful puppy had chewed on it",
                 "{he} had sat on it by mistake"][p.cause]
        return [f"{{N}} had {_a(color)} {obj} that {{his}} {p.relative} had given {{him}}.",
                f"One {time}, the {obj} broke, because {cause}.", f"{{N}} felt {sad} and began to cry.",
                f"So {{F}} came over with some {p.detail}, and together they fixed the {obj}.",
                "They worked slowly and carefully.", f"Then the {color} {obj} was as good as new."]
    # rain
    cause = ["big dark clouds had covered the sky", "a storm had come over the hills",
             "the wind had brought cold gray clouds"][p.cause]
    snack = rng.choice(SNACKS)
    return [f"{{N}} wanted to go to the {p.detail} for a picnic with {{F}}.",
            f"But that {time} it started to rain, because {cause}.", f"{{N}} felt {sad}.",
            "So {N} and {F} stayed inside and built a fort out of blankets.",
            f"They played with {{N}}'s {color} {obj} until the rain stopped.",
            f"Then the sun came out, and they went to the {p.detail} after all and ate {snack}."]


def render_story(p: Plot, rng: random.Random) -> str:
    """The story of a plot, in two paragraphs. Fixed sentence forms carry the facts that story
    questions ask about (`STORY_QUESTIONS`)."""
    opening = rng.choice(OPENINGS)
    hero = p.hero
    prep = HOMES[p.home]
    intro = [f"{opening}, there was {_a(p.adjective)} {hero.kind} named {{N}}.",
             f"{{N}} lived {prep} the {p.home} with {{his}} {p.relative}.", _helper_intro(p, rng)]
    end = [rng.choice(("{N} thanked {F} for the help.", "{N} thanked {F} and gave {fhim} a big hug.",
                       "{N} thanked {F} with a big smile.")),
           f"{{N}} felt {rng.choice(('very ', 'so ', ''))}{rng.choice(HAPPY)}."]
    body = _story_body(p, rng)
    text = " ".join(intro) + "\n" + " ".join(body + end)
    return text.format_map(_slots(hero, p.helper))


# Story questions: the question, and where its answer stands in any story (a pattern with one
# group). The generator keeps only questions whose pattern finds the intended answer, and
# `verify` applies the same pattern, so the truth is always recomputed from the prompt.
STORY_QUESTIONS: dict[str, tuple[str, str]] = {
    "name": ("What was the name of the {kind}?", r"\b{kind} named ([A-Z][a-z]+)\."),
    "home": ("Where did {N} live?", r"\b{N} lived (?:in|near|on|by) the ([a-z]+)\b"),
    "helper": ("Who helped {N}?", r"\b{N} thanked ([A-Z][a-z]+)\b"),
    "color": ("What color was {N}'s {obj}?", r"\b({colors}) {obj}\b"),
    "feeling": ("How did {N} feel at the end?", r"\b{N} felt (?:very |so )?([a-z]+)\.(?!.*\b{N} felt\b)"),
}
_QUESTION_PATTERNS = [
    ("name", re.compile(r"What was the name of the ([a-z]+)\?")),
    ("home", re.compile(r"Where did ([A-Z][a-z]+) live\?")),
    ("helper", re.compile(r"Who helped ([A-Z][a-z]+)\?")),
    ("color", re.compile(r"What color was ([A-Z][a-z]+)'s ([a-z]+)\?")),
    ("feeling", re.compile(r"How did ([A-Z][a-z]+) feel at the end\?")),
]


def _story_answer(story: str, question: str) -> str | None:
    """The answer to a story question, read from the story; None if the question is not one of
    STORY_QUESTIONS or the story does not state the answer exactly once."""
    for kind, pattern in _QUESTION_PATTERNS:
        m = pattern.fullmatch(question.strip())
        if m is None:
            continue
        if kind == "name":
            where = STORY_QUESTIONS[kind][1].format(kind=re.escape(m.group(1)))
        elif kind == "color":
            where = STORY_QUESTIONS[kind][1].format(colors="|".join(COLORS), obj=re.escape(m.group(2)))
        else:
            where = STORY_QUESTIONS[kind][1].format(N=re.escape(m.group(1)))
        found = {f for f in re.findall(where, story, flags=re.S)}
        return found.pop() if len(found) == 1 else None
    return None


def story_question(p: Plot, story: str, rng: random.Random) -> tuple[str, str]:
    """A question about the story and its answer (checked against the story text)."""
    kinds = ["name", "home", "helper", "feeling"] + (["color"] if p.color in story else [])
    while kinds:
        kind = kinds.pop(rng.randrange(len(kinds)))
        question = STORY_QUESTIONS[kind][0].format(kind=p.hero.kind, N=p.hero.name, obj=p.obj)
        truth = {"name": p.hero.name, "home": p.home, "helper": p.helper.name, "color": p.color}.get(kind)
        answer = _story_answer(story, question)
        if answer is not None and (truth is None or answer == truth):
            return question, answer
    raise AssertionError(f"no answerable question for the story:\n{story}")  # a grammar bug


QUESTION_PREFIX = "\n\nQuestion: "


def _draw_plot(rng: random.Random, want: str | None) -> Plot:
    """A plot in bucket `want` (any, when None): rejection sampling on the plot, which is cheap,
    before the story is rendered."""
    return _draw(rng, make_plot, want)


def make_story_qa(rng: random.Random, want: str | None = None) -> Item:
    plot = _draw_plot(rng, want)
    story = render_story(plot, rng)
    question, answer = story_question(plot, story, rng)
    return Item("story_qa", plot.key, story + QUESTION_PREFIX + question, answer, extra=plot)


# --- arithmetic --------------------------------------------------------------------------------

PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")
OPS = {"add": "+", "sub": "-", "mul": "*"}


def _place(i: int) -> str:
    return PLACES[i] if i < len(PLACES) else f"column {i + 1}"


def _digits(n: int) -> list[int]:
    """Digits of n >= 0, ones first."""
    return [int(c) for c in reversed(str(n))]


def worked_add(a: int, b: int, drop_carry: bool = False) -> tuple[str, int]:
    """Column addition from the right with carries. drop_carry: the classic mistake of writing
    the ones digit of each column and forgetting the carry (for rejected answers)."""
    da, db = _digits(a), _digits(b)
    lines = [f"Add {a} and {b}.", "Write the numbers in columns and add from the right, carrying when a column "
             "reaches 10."]
    carry, out = 0, []
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        total = sum(terms)
        expr = " + ".join(map(str, terms))
        if len(terms) == 1:
            lines.append(f"{_place(i)}: {expr}, write {total}")
            out.append(total)
            carry = 0
            continue
        digit, new_carry = total % 10, total // 10
        if drop_carry:
            new_carry = 0
        lines.append(f"{_place(i)}: {expr} = {total}, write {digit}" + (f" and carry {new_carry}" if new_carry else ""))
        out.append(digit)
        carry = new_carry
    if carry:
        lines.append(f"{_place(len(out))}: write the carry {carry}")
        out.append(carry)
    result = int("".join(map(str, reversed(out))))
    lines += [f"So {a} + {b} = {result}.", f"Answer: {result}"]
    return "\n".join(lines), result


def _column_subtract(a: int, b: int) -> tuple[list[str], int]:
    """Steps of a - b for a >= b >= 0, borrowing from the next column."""
    da, db = _digits(a), _digits(b)
    lines, borrow, out = [], 0, []
    for i, top in enumerate(da):
        bottom = db[i] if i < len(db) else 0
        terms = [top] + ([borrow] if borrow else []) + ([bottom] if i < len(db) else [])
        expr = " - ".join(map(str, terms))
        value = top - borrow - bottom
        if value < 0:
            expr10 = " - ".join(map(str, [top + 10] + terms[1:]))
            lines.append(f"{_place(i)}: {expr} is below zero, so borrow 1 from the {_place(i + 1)}: "
                         f"{expr10} = {value + 10}")
            out.append(value + 10)
            borrow = 1
        else:
            lines.append(f"{_place(i)}: {expr} = {value}" if len(terms) > 1 else f"{_place(i)}: {expr}, write {value}")
            out.append(value)
            borrow = 0
    return lines, int("".join(map(str, reversed(out))))


def worked_sub(a: int, b: int) -> tuple[str, int]:
    lines = [f"Subtract {b} from {a}."]
    if a < b:
        lines.append(f"{a} is smaller than {b}, so the result is negative: subtract {a} from {b} and put a "
                     "minus sign in front.")
        steps, result = _column_subtract(b, a)
        result = -result
    else:
        lines.append("Write the numbers in columns and subtract from the right, borrowing when a column goes "
                     "below zero.")
        steps, result = _column_subtract(a, b)
    lines += steps + [f"So {a} - {b} = {result}.", f"Answer: {result}"]
    return "\n".join(lines), result


def worked_mul(a: int, b: int) -> tuple[str, int]:
    """Long multiplication: one partial product per digit of b, shifted by its place, then summed.
    A one-digit b is worked digit by digit with carries."""
    lines = [f"Multiply {a} by {b}."]
    db = _digits(b)
    if len(db) == 1:
        carry, out = 0, []
        for i, d in enumerate(_digits(a)):
            total = d * b + carry
            expr = f"{d} * {b}" + (f" + {carry}" if carry else "")
            lines.append(f"{_place(i)}: {expr} = {total}, write {total % 10}"
                         + (f" and carry {total // 10}" if total // 10 else ""))
            out.append(total % 10)
            carry = total // 10
        if carry:
            lines.append(f"{_place(len(out))}: write the carry {carry}")
            out.append(carry)
        result = int("".join(map(str, reversed(out))))
    else:
        lines.append(f"Split {b} by place value and multiply {a} by each part.")
        partials = []
        for i, d in enumerate(db):
            part = d * 10**i
            if d == 0:
                lines.append(f"The {_place(i)} digit of {b} is 0, so it adds nothing.")
                continue
            lines.append(f"{a} * {part} = {a * part}")
            partials.append(a * part)
        result = sum(partials)
        if len(partials) > 1:
            lines.append(f"Add the partial products: {' + '.join(map(str, partials))} = {result}.")
    lines += [f"So {a} * {b} = {result}.", f"Answer: {result}"]
    return "\n".join(lines), result


WORKED = {"add": worked_add, "sub": worked_sub, "mul": worked_mul}


def _operand(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arith_key(task: str, a: int, b: int) -> str:
    if task in ("add", "mul"):  # commutative: 3 + 5 and 5 + 3 are one problem
        a, b = sorted((a, b))
    return f"{task}:{a}:{b}"


def _is_step(task: str, a: int, b: int) -> bool:
    """Problems that worked solutions contain as steps: the digit facts of column addition, the
    borrow facts of column subtraction (a teen minus a digit), and every product by a number with
    one nonzero digit (the partial products of long multiplication). Holding them out would be
    pointless, since any training solution may show them, so they always go to train."""
    if task == "add":
        return a < 10 and b < 10
    if task == "sub":
        return 0 <= a < 20 and 0 <= b < 10
    return any(sum(c != "0" for c in str(n)) <= 1 for n in (a, b))


def arith_bucket(task: str, a: int, b: int) -> str:
    return "train" if _is_step(task, a, b) else bucket(_arith_key(task, a, b))


# Phrasings: (template, worked?) -- `verify` parses every one of them.
ARITH_PROMPTS = {
    "add": [("What is {a} + {b}?", False), ("What is {a} plus {b}? Answer with just the number.", False),
            ("Add {a} and {b}.", True), ("Compute {a} + {b} step by step.", True)],
    "sub": [("What is {a} - {b}?", False), ("What is {a} minus {b}? Answer with just the number.", False),
            ("Subtract {b} from {a}.", True), ("Compute {a} - {b} step by step.", True)],
    "mul": [("What is {a} * {b}?", False), ("What is {a} times {b}? Answer with just the number.", False),
            ("Multiply {a} by {b}.", True), ("Compute {a} * {b} step by step.", True)],
}


def make_arith(task: str, max_digits: int, rng: random.Random, phrasing: int | None = None,
               want: str | None = None) -> Item:
    """An arithmetic problem (in bucket `want`, when given: operands are redrawn until it is)."""
    for _ in range(10_000):
        a, b = _operand(rng, max_digits), _operand(rng, max_digits)
        if task == "sub" and a < b and rng.random() < 0.8:  # mostly non-negative results
            a, b = b, a
        if task == "mul" and len(str(a)) < len(str(b)):  # the longer number on top, as written by hand
            a, b = b, a
        if want is None or arith_bucket(task, a, b) == want:
            break
    else:
        raise RuntimeError(f"no {want} {task} problem with {max_digits} digits in 10,000 draws")
    template, show_work = ARITH_PROMPTS[task][phrasing if phrasing is not None else rng.randrange(4)]
    worked, result = WORKED[task](a, b)
    return Item(task, _arith_key(task, a, b), template.format(a=a, b=b), str(result), worked, show_work, (a, b))


def wrong_arith(item: Item, rng: random.Random) -> tuple[str, str]:
    """A plausible wrong answer and what is wrong with it."""
    a, b = item.extra
    right = int(item.answer)
    candidates: list[tuple[int, str]] = []
    if item.task == "add":
        candidates.append((worked_add(a, b, drop_carry=True)[1], "forgets to carry"))
    if item.task == "sub" and a >= b:
        da, db = _digits(a), _digits(b)
        smaller_from_larger = [abs(x - (db[i] if i < len(db) else 0)) for i, x in enumerate(da)]
        candidates.append((int("".join(map(str, reversed(smaller_from_larger)))),
                           "subtracts the smaller digit from the larger in each column instead of borrowing"))
    if item.task == "mul" and b >= 10:
        candidates.append((sum(d * a for d in _digits(b)), "forgets to shift the partial products by place value"))
    place = 10 ** rng.randrange(len(str(abs(right))))
    candidates.append((right + rng.choice((-1, 1)) * place, "has one digit wrong"))
    wrong, why = next((w, y) for w, y in candidates if w != right)
    return str(wrong), why


def drill_document(task: str, max_digits: int, rng: random.Random, want: str) -> str:
    """Several equations `a op b = c`, one per line (direct answers for pretraining)."""
    lines = []
    for _ in range(rng.randint(8, 20)):
        item = make_arith(task, max_digits, rng, phrasing=0, want=want)
        a, b = item.extra
        lines.append(f"{a} {OPS[task]} {b} = {item.answer}")
    return "\n".join(lines)


# --- key-value lookup and copying ----------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"
KV_HEADER = "Remember these pairs:"
COPY_HEADER = "Repeat the following exactly:"
LIST_INSTRUCTION = "List all the keys above, in order, as a list."


def _random_token(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def make_kv_table(rng: random.Random) -> list[tuple[str, str]]:
    n, keys = rng.randint(3, 8), []
    while len(keys) < n:
        k = _random_token(rng)
        if k not in keys:
            keys.append(k)
    values = [str(rng.randint(0, 999)) if rng.random() < 0.6 else rng.choice(OBJECTS + COLORS + ANIMALS)
              for _ in keys]
    return list(zip(keys, values, strict=True))


def _kv_block(table: list[tuple[str, str]]) -> str:
    return KV_HEADER + "\n" + "\n".join(f"{k}: {v}" for k, v in table)


def _kv_key(table: list[tuple[str, str]]) -> str:
    return "kv:" + json.dumps(table)  # the table, whatever is asked about it


def make_kv(rng: random.Random, want: str | None = None) -> Item:
    table = make_kv_table(rng) if want is None else _draw_table(rng, want)
    key, value = rng.choice(table)
    prompt = f"{_kv_block(table)}{QUESTION_PREFIX}What is the value of {key}?"
    return Item("kv", _kv_key(table), prompt, value, extra=table)


def _draw_table(rng: random.Random, want: str) -> list[tuple[str, str]]:
    for _ in range(10_000):
        table = make_kv_table(rng)
        if bucket(_kv_key(table)) == want:
            return table
    raise RuntimeError(f"no {want} key-value table in 10,000 draws")


def make_copy(rng: random.Random, want: str | None = None) -> Item:
    def make(r: random.Random) -> Item:
        text = " ".join(_random_token(r, 2, 5) for _ in range(r.randint(3, 12)))
        return Item("copy", "copy:" + text, f"{COPY_HEADER}\n{text}", text)

    return _draw(rng, make, want)


# --- formatting instructions -------------------------------------------------------------------

FORMATS = {"upper": " Answer in uppercase.", "word": " Answer in one word."}


def make_format(rng: random.Random, want: str | None = None) -> Item:
    """A story question answered in uppercase or in one word, or a kv table's keys as a list.
    The key is the base problem's, so a held-out story or table is held out in every format."""
    style = rng.choice(("upper", "word", "list"))
    if style == "list":
        table = make_kv_table(rng) if want is None else _draw_table(rng, want)
        prompt = f"{_kv_block(table)}\n\n{LIST_INSTRUCTION}"
        return Item("format", _kv_key(table), prompt, "\n".join(f"- {k}" for k, _ in table), extra=("list", table))
    base = make_story_qa(rng, want)
    answer = base.answer.upper() if style == "upper" else base.answer
    return Item("format", base.key, base.prompt + FORMATS[style], answer, extra=(style, base))


def wrong_format(item: Item) -> tuple[str, str]:
    style = item.extra[0]
    if style == "upper":
        return item.answer.capitalize(), "has the right answer but not in uppercase as asked"
    if style == "word":
        return f"The answer is {item.answer}.", "answers in a sentence, not in one word as asked"
    keys = [line[2:] for line in item.answer.split("\n")]
    return ", ".join(keys), "gives the keys on one line, not as a list as asked"


# --- verifying answers ---------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+")
_ARITH_PATTERNS = {
    "add": [re.compile(r"(-?\d+) *(?:\+|plus) *(-?\d+)"), re.compile(r"Add (-?\d+) and (-?\d+)")],
    "sub": [re.compile(r"(-?\d+) *(?:-|minus) *(-?\d+)"), re.compile(r"Subtract (-?\d+) from (-?\d+)")],
    "mul": [re.compile(r"(-?\d+) *(?:\*|×|x|times) *(-?\d+)"), re.compile(r"Multiply (-?\d+) by (-?\d+)")],
}


def final_answer(answer: str) -> str:
    """The text after the last `Answer:` (the whole answer when there is none), stripped of
    surrounding space, quotes and a final period."""
    i = answer.rfind("Answer:")
    text = answer[i + len("Answer:"):] if i >= 0 else answer
    return text.strip().strip("\"'").rstrip(".").strip()


def arith_operands(task: str, prompt: str) -> tuple[int, int] | None:
    """(a, b) of an arithmetic prompt of `task` ("add", "sub", "mul") in any of the corpus's
    phrasings, such that the answer is a op b; None when the prompt is not one of them."""
    direct, phrase = _ARITH_PATTERNS[task]
    m = phrase.search(prompt)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        return (b, a) if task == "sub" else (a, b)  # "Subtract b from a"
    m = direct.search(prompt)
    return None if not m else (int(m.group(1)), int(m.group(2)))


def _arith_truth(task: str, prompt: str) -> int | None:
    operands = arith_operands(task, prompt)
    if operands is None:
        return None
    a, b = operands
    return {"add": a + b, "sub": a - b, "mul": a * b}[task]


def _kv_table(prompt: str) -> list[tuple[str, str]]:
    block = prompt.split(KV_HEADER, 1)[1].split("\n\n", 1)[0]
    return [tuple(line.split(": ", 1)) for line in block.strip().split("\n")]


def _normal(text: str) -> str:
    text = re.sub(r"[^\w\s]", "", text.lower()).strip()
    return re.sub(r"^(the|a|an) ", "", text)


def verify(task: str, prompt: str, answer: str) -> bool:
    """Whether `answer` correctly answers `prompt` for a task of EVAL_TASKS. The truth is
    recomputed from the prompt (the operands, the key-value table, the string to copy, the
    story), so this works for any prompt in these formats, generated here or not. An answer may
    be direct or a worked solution; then its last `Answer:` line counts."""
    if task in OPS:
        truth = _arith_truth(task, prompt)
        numbers = _NUMBER.findall(final_answer(answer))
        return truth is not None and bool(numbers) and int(numbers[-1]) == truth
    if task == "kv":
        m = re.search(r"What is the value of (\S+)\?", prompt)
        table = dict(_kv_table(prompt)) if KV_HEADER in prompt else {}
        return m is not None and m.group(1) in table and final_answer(answer) == table[m.group(1)]
    if task == "copy":
        if COPY_HEADER not in prompt:
            return False
        return final_answer(answer) == prompt.split(COPY_HEADER, 1)[1].strip()
    if task == "story_qa":
        story, _, question = prompt.rpartition(QUESTION_PREFIX)
        truth = _story_answer(story, question)
        return truth is not None and _normal(final_answer(answer)) == _normal(truth)
    if task == "format":
        return _verify_format(prompt, answer)
    raise ValueError(f"no verifier for task {task!r}; tasks with one: {', '.join(EVAL_TASKS)}")


def _verify_format(prompt: str, answer: str) -> bool:
    text = final_answer(answer)
    if prompt.endswith(LIST_INSTRUCTION):
        lines = [line.strip() for line in answer.strip().split("\n")]
        keys = [k for k, _ in _kv_table(prompt)]
        return all(line.startswith("- ") for line in lines) and [line[2:].strip() for line in lines] == keys
    for style, suffix in FORMATS.items():
        if prompt.endswith(suffix):
            base = prompt[: -len(suffix)]
            if not verify("story_qa", base, text):
                return False
            return text == text.upper() if style == "upper" else len(text.split()) == 1
    return False


# --- chat examples and preference pairs ------------------------------------------------------

STORY_REQUESTS = ("Write a story about {a_kind}.", "Write a short story about {a_kind} named {N}.",
                  "Tell me a story about {N} and a {obj}.", "Write a story where {N} needs help from a friend.")


def _chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _draw_item(task: str, config: SynthConfig, rng: random.Random, want: str) -> Item:
    if task in OPS:
        digits = config.max_mul_digits if task == "mul" else config.max_digits
        return make_arith(task, digits, rng, want=want)
    return {"kv": make_kv, "copy": make_copy, "story_qa": make_story_qa, "format": make_format}[task](rng, want)


SFT_TASKS = ("story", "add", "sub", "mul", "kv", "copy", "story_qa", "format")
SFT_WEIGHTS = (3, 2, 2, 2, 2, 1, 2, 2)


def sft_example(config: SynthConfig, rng: random.Random, want: str) -> dict:
    task = rng.choices(SFT_TASKS, SFT_WEIGHTS)[0]
    if task == "story":
        plot = _draw_plot(rng, want)
        request = rng.choice(STORY_REQUESTS).format(a_kind=_a(plot.hero.kind), N=plot.hero.name, obj=plot.obj)
        return {"messages": _chat(request, render_story(plot, rng)), "task": "story"}
    item = _draw_item(task, config, rng, want)
    return {"messages": _chat(item.prompt, item.worked if item.show_work else item.answer), "task": task}


PREFERENCE_TASKS = ("add", "sub", "mul", "kv", "copy", "story_qa", "format")


def preference_pair(config: SynthConfig, rng: random.Random, want: str) -> dict:
    task = rng.choice(PREFERENCE_TASKS)
    item = _draw_item(task, config, rng, want)
    chosen = item.answer
    if task in OPS:
        rejected, why = wrong_arith(item, rng)
        reason = f"the chosen answer is correct ({item.answer}); the rejected one ({rejected}) {why}"
        a, b = item.extra
        if task == "add" and rng.random() < 0.5 and worked_add(a, b, drop_carry=True)[1] != int(item.answer):
            chosen, rejected = item.worked, worked_add(a, b, drop_carry=True)[0]
            reason = f"the chosen solution carries correctly and gets {item.answer}; the rejected one forgets to carry"
    elif task == "kv":
        table = item.extra
        others = [v for _, v in table if v != item.answer]
        rejected = rng.choice(others) if others else item.answer + "0"
        reason = f"the chosen answer is the value stored under the key; the rejected one ({rejected}) is not"
    elif task == "copy":
        tokens = item.answer.split(" ")
        i = rng.randrange(len(tokens))
        rejected = " ".join(tokens[:i] + tokens[i + 1:]) if len(tokens) > 1 else item.answer[::-1] + "x"
        reason = "the chosen answer repeats the text exactly; the rejected one drops a word"
    elif task == "story_qa":
        plot = item.extra
        pool = [plot.hero.name, plot.helper.name, plot.home, plot.color] + list(HAPPY)
        rejected = rng.choice([p for p in pool if _normal(p) != _normal(item.answer)])
        reason = f"the story says {item.answer}, not {rejected}"
    else:
        rejected, why = wrong_format(item)
        reason = f"both answers have the right content, but the rejected one {why}"
    return {"prompt": item.prompt, "messages": [{"role": "user", "content": item.prompt}],
            "chosen": chosen, "rejected": rejected, "reason": reason, "task": task}


# --- pretraining documents ----------------------------------------------------------------------

PRETRAIN_TASKS = ("story", "story_qa", "worked", "drill", "kv", "copy")
PRETRAIN_WEIGHTS = (40, 12, 16, 10, 14, 8)


def pretrain_document(config: SynthConfig, rng: random.Random, want: str) -> dict:
    task = rng.choices(PRETRAIN_TASKS, PRETRAIN_WEIGHTS)[0]
    if task == "story":
        return {"text": render_story(_draw_plot(rng, want), rng), "task": "story"}
    if task == "story_qa":
        plot = _draw_plot(rng, want)
        story = render_story(plot, rng)
        qas = []
        for _ in range(rng.randint(1, 3)):
            q, a = story_question(plot, story, rng)
            if q not in (x for x, _ in qas):
                qas.append((q, a))
        return {"text": story + "".join(f"{QUESTION_PREFIX}{q}\nAnswer: {a}" for q, a in qas), "task": "story_qa"}
    if task in ("worked", "drill"):
        op = rng.choice(tuple(OPS))
        digits = config.max_mul_digits if op == "mul" else config.max_digits
        if task == "drill":
            return {"text": drill_document(op, digits, rng, want), "task": f"{op}_drill"}
        return {"text": make_arith(op, digits, rng, want=want).worked, "task": f"{op}_worked"}
    item = (make_kv if task == "kv" else make_copy)(rng, want)
    return {"text": f"{item.prompt}\nAnswer: {item.answer}", "task": task}


def eval_items(config: SynthConfig, task: str) -> list[dict]:
    """`config.n_eval` distinct held-out items of one task."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown eval task {task!r}; tasks: {', '.join(EVAL_TASKS)}")
    rng = _rng(config, f"eval/{task}")
    items: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < config.n_eval:
        attempts += 1
        if attempts > 50 * config.n_eval + 1000:
            raise RuntimeError(f"could not draw {config.n_eval} distinct {task} eval items (the problem space is "
                               "too small: raise max_digits or lower n_eval)")
        item = _draw_item(task, config, rng, "eval")
        if item.prompt not in seen:
            seen.add(item.prompt)
            items.append({"prompt": item.prompt, "answer": item.answer, "task": task})
    return items


# --- writing ------------------------------------------------------------------------------------

def _rng(config: SynthConfig, stream: str) -> random.Random:
    # Seeding with a string hashes it with SHA-512: stable across runs, platforms and Python versions.
    return random.Random(f"lmlab-synthetic:{config.seed}:{stream}")


def layout() -> dict[str, tuple[str, ...]]:
    """Split name -> files (relative to the output directory), as the dataset registry reads them."""
    return {
        "train": ("pretrain/train.jsonl",), "validation": ("pretrain/val.jsonl",),
        "sft": ("sft/train.jsonl",), "sft-validation": ("sft/val.jsonl",),
        "preference": ("preference/train.jsonl",), "preference-validation": ("preference/val.jsonl",),
        "eval": tuple(f"eval/{t}.jsonl" for t in EVAL_TASKS),
        **{f"eval-{t}": (f"eval/{t}.jsonl",) for t in EVAL_TASKS},
    }


class _HashingWriter:
    """A text file that hashes what is written to it, for the manifest."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: TextIO = open(path, "w", encoding="utf-8", newline="\n")
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.records = 0

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        self.sha.update(data)
        self.bytes += len(data)
        self.file.write(text)

    def close(self) -> dict[str, Any]:
        self.file.close()
        return {"sha256": self.sha.hexdigest(), "bytes": self.bytes, "records": self.records}


def _split_counts(n: int, val_fraction: float) -> dict[str, int]:
    n_val = round(n * val_fraction)
    return {"train": n - n_val, "validation": n_val}


def generate(out: str | Path, config: SynthConfig | None = None, *, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Write the corpus to `out` (see the module docstring for the layout), atomically: the
    directory appears complete or not at all. Returns the manifest."""
    config = config or SynthConfig()
    pretrain = _split_counts(config.n_pretrain, config.val_fraction)
    sft = _split_counts(config.n_sft, config.val_fraction)
    pref = _split_counts(config.n_preference, config.val_fraction)
    total = config.n_pretrain + config.n_sft + config.n_preference + config.n_eval * len(EVAL_TASKS)
    files: dict[str, dict] = {}
    counts: dict[str, Any] = {}
    with atomic_directory(out, overwrite=overwrite) as tmp, tqdm(
        total=total, desc="synthetic corpus", unit="doc", disable=not progress
    ) as bar:
        for split, name in (("train", "train"), ("validation", "val")):
            rng = _rng(config, f"pretrain/{split}")
            txt, jsonl = _HashingWriter(tmp / f"pretrain/{name}.txt"), _HashingWriter(tmp / f"pretrain/{name}.jsonl")
            tasks: dict[str, int] = {}
            for _ in range(pretrain[split]):
                doc = pretrain_document(config, rng, split)
                txt.write(f"{doc['text']}\n{DOC_SEPARATOR}\n")
                jsonl.write(json.dumps(doc, ensure_ascii=False) + "\n")
                txt.records += 1
                jsonl.records += 1
                tasks[doc["task"]] = tasks.get(doc["task"], 0) + 1
                bar.update()
            files[f"pretrain/{name}.txt"], files[f"pretrain/{name}.jsonl"] = txt.close(), jsonl.close()
            counts[f"pretrain/{name}"] = dict(sorted(tasks.items()))
        for kind, sizes, make in (("sft", sft, sft_example), ("preference", pref, preference_pair)):
            for split, name in (("train", "train"), ("validation", "val")):
                rng = _rng(config, f"{kind}/{split}")
                w = _HashingWriter(tmp / f"{kind}/{name}.jsonl")
                tasks = {}
                for _ in range(sizes[split]):
                    example = make(config, rng, split)
                    w.write(json.dumps(example, ensure_ascii=False) + "\n")
                    w.records += 1
                    tasks[example["task"]] = tasks.get(example["task"], 0) + 1
                    bar.update()
                files[f"{kind}/{name}.jsonl"] = w.close()
                counts[f"{kind}/{name}"] = dict(sorted(tasks.items()))
        for task in EVAL_TASKS:
            w = _HashingWriter(tmp / f"eval/{task}.jsonl")
            for item in eval_items(config, task):
                w.write(json.dumps(item, ensure_ascii=False) + "\n")
                w.records += 1
                bar.update()
            files[f"eval/{task}.jsonl"] = w.close()
        manifest = {
            "generator": "lmlab.data.synthetic", "version": GENERATOR_VERSION, "seed": config.seed,
            "config": config.to_dict(), "document_separator": DOC_SEPARATOR,
            "buckets": {"eval": EVAL_SHARE, "validation": VALIDATION_SHARE,
                        "train": round(1 - EVAL_SHARE - VALIDATION_SHARE, 6)},
            "tasks": counts, "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_current(directory: str | Path, config: SynthConfig) -> bool:
    """Whether `directory` holds, intact, what `generate(directory, config)` would write."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("version") != GENERATOR_VERSION or manifest.get("config") != config.to_dict():
        return False
    for rel, info in manifest.get("files", {}).items():
        path = Path(directory) / rel
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
        if hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]:
            return False
    return True


def ensure(directory: str | Path, config: SynthConfig, *, progress: bool = True) -> Path:
    """Generate into `directory` unless it already holds this config's corpus, intact."""
    directory = Path(directory)
    if not is_current(directory, config):
        generate(directory, config, overwrite=True, progress=progress)
    return directory
