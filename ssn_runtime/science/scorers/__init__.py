"""Neuron scorers: each turns NeuronStats (or a model) into a [layers, neurons] score or a
neuron set, with its formula in the docstring.

    contrast      harmful vs harmless within a language: mean difference, Cohen's d, frequency difference
    lape          language specificity of activation probabilities (LAPE)
    consistent    per-sequence top-k consistency on harmful minus harmless text (PLND / SN-Tune)
    attribution   activation x gradient estimate of a target's change when a neuron is zeroed
"""

from .attribution import ablation_effect, attribution_scores
from .consistent import consistent_neurons
from .contrast import cohens_d, freq_difference, mean_difference
from .lape import LapeResult, lape

__all__ = ["LapeResult", "ablation_effect", "attribution_scores", "cohens_d", "consistent_neurons",
           "freq_difference", "lape", "mean_difference"]
