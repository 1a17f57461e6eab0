"""The science: profiling statistics (collector, profiler, stats), scoring and selecting neurons
(scorers/, identify, neuron_sets, analysis), masks, and measuring what a model says
(judges, evaluate, validate)."""
