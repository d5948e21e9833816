"""lorafam: fine-tune Hugging Face models with the LoRA family."""

import warnings

# bitsandbytes on CPU tries to fetch a fused kernel from the hub on import and warns when it cannot;
# it then uses its bundled CPU library, so the warning is noise for our users.
warnings.filterwarnings("ignore", message=r".*kernels-community.*")
warnings.filterwarnings("ignore", message=r".*pip install kernels.*")

__version__ = "0.1.0"
