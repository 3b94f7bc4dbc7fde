"""vadsearch: resumable hyperparameter search for Valence-Arousal-Dominance regression."""

__version__ = "0.1.0"
