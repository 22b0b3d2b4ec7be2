"""Synthetic training prompts for self-distillation: templates x our own topic lists x random values.

None of this comes from Spec-Bench (neither split): the tasks mirror its kinds (writing, roleplay,
reasoning, math word problems, coding, extraction, STEM, humanities, translation, summarization, QA,
retrieval-augmented answers) so the drafter sees the same shapes of text, while every prompt is built
here from a seed. Summarization and RAG prompts wrap passages that the target itself wrote in a first
round (`passage_prompts`), so the drafter also learns to copy from its context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS = """\
rivers, volcanoes, honeybees, the printing press, bicycles, coral reefs, the water cycle, glaciers, solar
panels, electric cars, ancient Rome, the Silk Road, chess, jazz, the violin, photosynthesis, black holes,
vaccines, the internet, recycling, city parks, public libraries, bread baking, coffee farming, tea
ceremonies, marathon running, mountain climbing, deserts, rainforests, the Arctic, penguins, wolves,
octopuses, migration of birds, earthquakes, hurricanes, wind turbines, the steam engine, the telescope, the
microscope, antibiotics, the human heart, sleep, memory, language learning, origami, pottery, architecture
of bridges, lighthouses, trains, airports, the postal service, museums, theatre, opera, poetry, comic books,
video games, board games, football, basketball, the Olympic Games, gardening, composting, beekeeping, cheese
making, chocolate, spices, rice farming, fishing villages, the moon landing, Mars rovers, satellites, GPS,
clocks, calendars, money, banks, small businesses, remote work, teamwork, leadership, time management,
public speaking, friendship, kindness, volunteering, grandparents, childhood games, school uniforms,
homework, exams, universities, robots, artificial intelligence, cybersecurity, passwords, smartphones,
batteries, 3D printing, drones, submarines, whales, dinosaurs, fossils, the Great Wall, pyramids, castles,
knights, pirates, explorers, maps, compasses, weather forecasts, rainbows, snowflakes, thunderstorms, tides,
the seasons, autumn leaves, spring flowers, wildfires, clean water, vegetables, healthy breakfast, cooking
pasta, street food, night markets, festivals, music festivals, film making, photography, painting,
sculpture, dance, knitting, carpentry, plumbing, electricity at home, saving energy, insurance, taxes,
budgeting, recipes for soup, camping, hiking safety, first aid, dogs, cats, horses, farm life, city life"""
TOPIC_LIST = [t.strip() for t in TOPICS.replace("\n", " ").split(",") if t.strip()]

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kenji", "Lena", "Marco",
         "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "cupcakes", "marbles", "books", "tickets", "plants", "cookies", "shells"]

WRITING = [
    "Write a short story about {topic}.", "Write a persuasive paragraph about why people should care about {topic}.",
    "Write a professional email to a colleague proposing a workshop on {topic}.", "Write a poem about {topic}.",
    "Write a blog post introduction about {topic}.", "Draft a short speech for a school event about {topic}.",
    "Write a product description for something related to {topic}.",
    "Write a diary entry from someone who loves {topic}.",
]
ROLEPLAY = [
    "Pretend you are a tour guide. Describe {topic} to a group of visitors.",
    "Act as a teacher and explain {topic} to a class of ten-year-olds.",
    "You are a news reporter. Give a short live report about {topic}.",
    "Imagine you are a historian in the year 2200. What would you say about {topic}?",
]
EXPLAIN = [
    "Explain {topic} in simple terms.", "What are the main advantages and disadvantages of {topic}?",
    "Give three interesting facts about {topic}.", "How does {topic} affect everyday life?",
    "Describe the history of {topic} in a few sentences.", "What should a beginner know about {topic}?",
    "Compare {topic} and {topic2}. How are they similar and different?",
    "List five questions a student might ask about {topic}, with short answers.",
]
QA = ["What is {topic}?", "Why is {topic} important?", "Who would be interested in {topic}, and why?",
      "Where can someone learn more about {topic}?", "When did people start paying attention to {topic}?"]
CODING = [
    "Write a Python function that returns the {k} largest numbers in a list.",
    "Write a Python function that counts how many times each word appears in a string.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a JavaScript function that reverses an array without using reverse().",
    "Write a SQL query that finds the {k} most recent orders in a table called orders.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Write a Python function that computes the {k}th Fibonacci number iteratively.",
    "Explain what this Python code does: `sorted(set(x % {k} for x in range(100)))`",
    "Write a C function that sums the elements of an integer array of length n.",
]
PASSAGE = ["Write a news article of about 250 words about {topic}.",
           "Write an encyclopedia-style passage of about 200 words about {topic}.",
           "Write a detailed report of about 250 words about a recent local event involving {topic}."]
SUMMARIZE = ["Summarize: {passage}", "Summarize the following text in two sentences.\n\n{passage}",
             "{passage}\n\nWrite a one-paragraph summary of the text above."]
RAG = ["{passage}\n\nBased on the passage above, answer: what is the main point about {topic}?",
       "Read the text and answer the question.\n\n{passage}\n\nQuestion: What details does the text give about "
       "{topic}?", "{passage}\n\nExtract three key facts from the passage as a bulleted list."]

# German -> English: sentences composed here from a small lexicon (subject, verb phrase, place / time)
DE_SUBJECTS = ["Der Lehrer", "Die Ärztin", "Mein Bruder", "Unsere Nachbarin", "Der Bürgermeister", "Die Kinder",
               "Das Team", "Der Bauer", "Die Studentin", "Meine Großmutter", "Der Koch", "Die Polizei"]
DE_VERBS = ["liest ein Buch", "trinkt einen Kaffee", "schreibt einen Brief", "besucht das Museum",
            "kauft frisches Brot", "spielt Fußball", "arbeitet an einem neuen Projekt", "repariert das Fahrrad",
            "plant eine Reise nach Berlin", "erklärt die Regeln", "wartet auf den Zug", "hilft den Nachbarn"]
DE_PLACES = ["im Garten", "am Montag", "in der Stadt", "nach der Arbeit", "am Wochenende", "im Sommer",
             "trotz des Regens", "mit großer Freude", "seit drei Jahren", "jeden Morgen", "in der Schule"]


@dataclass(frozen=True)
class Prompt:
    kind: str
    text: str


def math_problem(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 40), rng.randint(2, 20), rng.randint(2, 9)
    name, name2, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice([
        f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {name2}. How many {item} does {name} "
        "have now?",
        f"A box holds {b} {item}. {name} fills {c} boxes and has {a} {item} left over. How many {item} did "
        f"{name} have at the start?",
        f"{name} earns ${a} per hour and works {c} hours a day for {b} days. How much does {name} earn in total?",
        f"A train travels {a * 10} kilometres in {c} hours. At the same speed, how far does it go in {b} hours?",
        f"{name} reads {b} pages a day. The book has {a * c} pages. How many days does {name} need to finish it?",
        f"There are {a} students in a class. {c} of every {c + b % 5 + 1} students walk to school. About how many "
        "students walk to school?",
    ]) + " Think step by step."


def translation(rng: random.Random) -> str:
    sentence = f"{rng.choice(DE_SUBJECTS)} {rng.choice(DE_VERBS)} {rng.choice(DE_PLACES)}."
    if rng.random() < 0.4:
        sentence += f" {rng.choice(DE_SUBJECTS)} {rng.choice(DE_VERBS)} {rng.choice(DE_PLACES)}."
    return f"Translate German to English: {sentence}"


def direct_prompts(n: int, seed: int) -> list[Prompt]:
    """n prompts that need no passage, reproducible from the seed."""
    rng = random.Random(seed)
    makers = [
        ("writing", 3, lambda: rng.choice(WRITING)), ("roleplay", 1, lambda: rng.choice(ROLEPLAY)),
        ("explain", 3, lambda: rng.choice(EXPLAIN)), ("qa", 2, lambda: rng.choice(QA)),
        ("coding", 1, lambda: rng.choice(CODING)), ("math", 2, lambda: math_problem(rng)),
        ("translation", 2, lambda: translation(rng)),
    ]
    kinds = [m for m in makers for _ in range(m[1])]
    out = []
    for _ in range(n):
        kind, _, make = rng.choice(kinds)
        topic, topic2 = rng.sample(TOPIC_LIST, 2)
        out.append(Prompt(kind, make().format(topic=topic, topic2=topic2, k=rng.randint(2, 12))))
    return out


def passage_prompts(n: int, seed: int) -> list[Prompt]:
    """n prompts asking the target for passages; their answers feed `context_prompts`."""
    rng = random.Random(seed + 1)
    return [Prompt("passage", rng.choice(PASSAGE).format(topic=rng.choice(TOPIC_LIST))) for _ in range(n)]


def context_prompts(passages: list[tuple[str, str]], seed: int) -> list[Prompt]:
    """Summarization and RAG prompts over (topic-bearing prompt, passage) pairs the target wrote."""
    rng = random.Random(seed + 2)
    out = []
    for source, passage in passages:
        topic = next((t for t in TOPIC_LIST if t in source), "the topic")
        if rng.random() < 0.5:
            out.append(Prompt("summarization", rng.choice(SUMMARIZE).format(passage=passage)))
        else:
            out.append(Prompt("rag", rng.choice(RAG).format(passage=passage, topic=topic)))
    return out
