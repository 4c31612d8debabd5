"""Prompts the teacher answers to make distillation text: topics x templates, written for this
project (no evaluation set was read to write them).

Variety matters more than polish: a student learns what the teacher says about many subjects in
many registers (explanations, stories, how-to steps, questions with answers, encyclopedia prose,
plain continuations). Chat prompts go through the teacher's chat template; plain openers are
continued as a base LM would.

Contamination: nothing here is drawn from the offline task suite, and the recipe checks the
sampled text against every evaluation set (13-gram overlap, `meestral.training.teacher_text.contamination`).
"""

from __future__ import annotations

import random

TOPICS = """
photosynthesis; the water cycle; plate tectonics; volcanoes; earthquakes; the solar system; black holes;
the moon's phases; tides; weather fronts; hurricanes; climate and seasons; the rock cycle; fossils;
evolution by natural selection; genetics and DNA; cells and their parts; the human heart; blood and
circulation; the immune system; vaccines; bacteria and viruses; digestion; the nervous system; the brain;
sleep; nutrition and vitamins; exercise and muscles; bones and the skeleton; the eye and vision; hearing
and sound; food chains; ecosystems; pollination and bees; migration of birds; frogs and their life
cycle; butterflies and metamorphosis; dinosaurs; whales; sharks; coral reefs; rainforests; deserts;
glaciers; rivers and erosion; soil; recycling; renewable energy; solar panels; wind turbines; fossil
fuels; electricity and circuits; magnets; gravity; friction; simple machines; levers and pulleys;
motion and speed; energy and work; heat and temperature; states of matter; melting and boiling; atoms
and molecules; the periodic table; chemical reactions; acids and bases; mixtures and solutions; light
and shadows; rainbows; mirrors and lenses; the speed of light; sound waves; telescopes; microscopes;
computers; the internet; programming; algorithms; robots; artificial intelligence; smartphones;
batteries; cars and engines; airplanes and flight; trains; ships and boats; bridges; skyscrapers;
roads and maps; the printing press; the wheel; ancient Egypt; ancient Greece; the Roman Empire;
the Middle Ages; castles; the Renaissance; the Industrial Revolution; the American Revolution; the
French Revolution; world exploration; the Silk Road; the Vikings; the history of writing; money and
banks; trade; farming; gardening; growing tomatoes; composting; raising chickens; baking bread;
cooking rice; making soup; kitchen safety; keeping food fresh; cleaning a house; doing laundry;
removing stains; fixing a flat bicycle tire; painting a room; building a birdhouse; woodworking tools;
sewing a button; first aid; treating a burn; staying safe in a storm; camping; starting a campfire;
hiking; swimming; fishing; planting a tree; caring for a dog; caring for a cat; keeping fish in an
aquarium; horses; cows and dairy; honey; coffee; tea; chocolate; cheese; spices; pizza; sandwiches;
breakfast foods; table manners; birthdays; weddings; holidays around the world; music and
instruments; the piano; the guitar; painting and color mixing; drawing; photography; poetry; novels;
libraries; newspapers; theater; film; dance; sports; soccer; basketball; baseball; tennis; the Olympic
Games; chess; board games; puzzles; mathematics; fractions; geometry; triangles; measuring length;
units of weight; time and clocks; calendars; counting money; percentages; statistics; probability;
graphs; economics; jobs and careers; teachers; doctors; firefighters; farmers; engineers; scientists;
the scientific method; experiments; inventions; famous inventors; space travel; astronauts; the
International Space Station; Mars; Jupiter; stars; comets; maps and compasses; continents; oceans;
mountains; islands; cities; villages; countries of Europe; countries of Asia; countries of Africa;
South America; North America; Australia; Antarctica; languages; learning a new language; grammar;
punctuation; writing a letter; giving a speech; friendship; kindness; honesty; teamwork; solving
conflicts; saving money; shopping; advertising; elections and voting; laws and courts; the
constitution; human rights; public health; hospitals; medicine; pharmacies; dentists and teeth;
hygiene and washing hands; clothing and fabrics; shoes; winter clothing; umbrellas; houses in
different climates; insulation; plumbing; lighting; furniture; glass; metals; plastics; paper; wood;
concrete; pottery; rubber; oil; salt; sugar; water purification; wells; dams; irrigation; floods;
droughts; wildfires; air pollution; noise; insects; spiders; ants; earthworms; snakes; lizards; owls;
penguins; elephants; lions; wolves; bears; monkeys; octopuses; jellyfish; mushrooms; ferns; cacti;
seeds and germination; leaves changing color in autumn; snow; ice; clouds; lightning; wind;
the Sun; eclipses; the Earth's rotation; day and night; time zones; Shakespeare's plays; Greek myths;
fairy tales; fables; heroes in legends; kings and queens; knights; pirates; detectives; a small town
bakery; a lighthouse keeper; a journey across the sea; a day at the market; a rainy afternoon
"""

TOPICS = [t.strip() for t in TOPICS.replace("\n", " ").split(";") if t.strip()]

CHAT_TEMPLATES = [
    "Explain {t} to a curious twelve-year-old.",
    "Write a short encyclopedia article about {t}.",
    "What are the most important facts about {t}?",
    "Give me five surprising facts about {t}, with a sentence of explanation each.",
    "Write a multiple-choice quiz question about {t} with four options, then give the correct answer and why.",
    "Write three science questions about {t} and answer each one in a few sentences.",
    "Describe, step by step, how someone would get started with {t}.",
    "What are common misconceptions about {t}? Correct each one.",
    "Write a short story in which {t} plays an important part.",
    "Compare {t} with {u}. How are they alike and how do they differ?",
    "Why does {t} matter in everyday life?",
    "Summarize the history of {t} in one paragraph.",
    "Write a lesson plan for teaching {t} to a class.",
    "If you had to explain {t} in a single paragraph, what would you say?",
    "What would happen if {t} did not exist?",
    "Write a dialogue between a student and a teacher about {t}.",
    "List the key words someone should know about {t} and define each.",
    "Give practical advice about {t} for a beginner.",
    "Describe a simple experiment or observation that shows something about {t}.",
    "What is the cause and what is the effect when it comes to {t}?",
    "Write a friendly letter to a friend describing {t}.",
    "Answer briefly: what is {t}?",
    "Tell me how {t} works, using an everyday example.",
    "What tools or materials are involved in {t}, and what is each used for?",
]

PLAIN_TEMPLATES = [
    "{T} is",
    "The following is an introduction to {t}.\n\n",
    "Chapter 1: {T}\n\n",
    "Here is what every student should know about {t}:",
    "Question: What is the most important thing to know about {t}?\nAnswer:",
    "In this article we look at {t}.",
    "A brief guide to {t}\n\n",
    "When people think about {t}, they often",
    "My grandmother once told me a story about {t}.",
    "How to understand {t}:\n1.",
    "Once upon a time,",
    "It was early in the morning when",
    "Scientists have long been interested in {t} because",
    "The teacher began the lesson on {t} by asking",
]


def sample_prompt(rng: random.Random) -> tuple[str, bool]:
    """(prompt text, whether to wrap it in the chat template); 3 chat prompts for 1 plain one."""
    t, u = rng.sample(TOPICS, 2)
    chat = rng.random() < 0.75
    template = rng.choice(CHAT_TEMPLATES if chat else PLAIN_TEMPLATES)
    return template.format(t=t, u=u, T=t[:1].upper() + t[1:]), chat
