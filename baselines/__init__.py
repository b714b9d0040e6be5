"""Composed-image-retrieval baselines behind one interface (``QueryComposer``), built by name:

    get_composer("searle", weights_dir=...)  ->  encode_gallery / encode_query / score

One module per method; adding one is one file plus its ``BASELINES.register`` line and an
import below. (tests/tiny_weights.py writes tiny random weights in each author's format.)
"""
from cir_bench_baselines.base import BASELINES, BadWeightsError, MissingWeightsError, QueryComposer, WeightsFile, \
    get_composer, resolve_weights_root
from cir_bench_baselines import basic, clip4cir, clip_refs, covr, freedom, lincir, pic2word, searle, searle_oti  # noqa

__all__ = ["BASELINES", "BadWeightsError", "MissingWeightsError", "QueryComposer", "WeightsFile", "get_composer",
           "resolve_weights_root"]
