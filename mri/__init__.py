"""mri: an MRI for AI — open transformer language models, record what happens inside, and find problems.

The public entry points live here so that `import mri; mri.load(...)` is all a user needs to start.
"""

from mri.models import Model, RunOutput, load

__all__ = ["Model", "RunOutput", "load", "__version__"]
__version__ = "0.1.0"
