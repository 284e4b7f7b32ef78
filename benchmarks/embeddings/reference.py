"""Reference vectors for check.py, from sentence-transformers itself (needs torch: run it in a
separate environment, not Interlock's).

    python reference.py <sentence-transformers model dir> > reference.json
"""

from __future__ import annotations

import json
import sys

from sentence_transformers import SentenceTransformer
from sentences import SENTENCES

model = SentenceTransformer(sys.argv[1], device="cpu")
vectors = model.encode(SENTENCES, normalize_embeddings=True)
json.dump({"model": sys.argv[1], "sentences": SENTENCES, "vectors": vectors.tolist()}, sys.stdout)
