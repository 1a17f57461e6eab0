"""Neuron-oriented training: train only chosen neurons (train) and store the result as a
NeuronPatch (patches); attention output channels as trainable neurons (attention_neurons)."""
