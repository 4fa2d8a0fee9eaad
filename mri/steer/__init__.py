"""Steering: add, clamp or ablate features (or add vectors) during generation; choose the strength by
measuring concept presence against fluency under the unsteered model.

    from mri.steer import FeatureEdit, Steering, generate, calibrate, concept_demo
"""

from mri.steer.calibrate import Calibration, calibrate, default_strengths
from mri.steer.concept_demo import concept_demo
from mri.steer.generate import Generations, generate, largest_finite_strength
from mri.steer.interventions import (
    FeatureEdit,
    NonFiniteSteering,
    Steering,
    VectorEdit,
    diff_of_means,
    load_vector,
    save_vector,
)
from mri.steer.measure import Measurement, concept_tokens, measure, neutral_prompts

__all__ = [
    "Calibration",
    "FeatureEdit",
    "Generations",
    "Measurement",
    "NonFiniteSteering",
    "Steering",
    "VectorEdit",
    "calibrate",
    "concept_demo",
    "concept_tokens",
    "default_strengths",
    "diff_of_means",
    "generate",
    "largest_finite_strength",
    "load_vector",
    "measure",
    "neutral_prompts",
    "save_vector",
]
