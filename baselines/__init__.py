"""Composed-image-retrieval baseline adapters (CLIP4CIR, Pic2Word, SEARLE, CoVR) — see issue #7."""
