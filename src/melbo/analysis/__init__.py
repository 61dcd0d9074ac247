"""Studying vectors: evaluation (completions, KL, labels), the choice of bases, fidelity of MELBO-ortho copies,
composition and presence probes."""
