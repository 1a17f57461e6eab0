"""The built-in model organism: a tiny multilingual, safety-aligned causal LM trained by
this project's own code, with safety strong in its high-resource language and weaker in
the others. See build.py (training), data.py (data) and language.py (languages).
"""

from .build import OrganismConfig, build
from .cache import default_path, ensure

__all__ = ["OrganismConfig", "build", "default_path", "ensure"]
