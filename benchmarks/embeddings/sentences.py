"""The sentences check.py and reference.py embed: pairs that mean the same, and ones that do not."""

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new film is so great.",
    "A cat is playing the piano.",
    "A kitten plays a keyboard instrument.",
    "Interest rates rose again this quarter.",
    "The central bank increased borrowing costs.",
    "How do I reset my password?",
    "I forgot my login credentials and need to change them.",
    "The train to Berlin leaves at noon.",
    "Photosynthesis turns light into chemical energy.",
]
#: (i, j) pairs that should be closer to each other than to anything else
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
